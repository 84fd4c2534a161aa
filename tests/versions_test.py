"""The start-up check of TensorFlow, Keras and tfds versions."""

import importlib
import sys

import pytest

from sam import versions


@pytest.mark.parametrize('tf_version,keras_version', [
    ('2.16.1', '3.10.0'), ('2.20.0', '3.12.4'), ('2.21.0', '3.15.1'),
    ('2.21.0rc1', '3.13.0'),
])
def test_supported_versions_pass(tf_version, keras_version):
  versions.check(tf_version, keras_version)


@pytest.mark.parametrize('tf_version,keras_version,names', [
    ('2.15.1', '3.10.0', 'TensorFlow 2.15.1'),
    ('2.22.0', '3.15.1', 'TensorFlow 2.22.0'),
    ('2.16.1', '3.9.2', 'Keras 3.9.2'),
    ('2.16.1', '2.15.0', 'Keras 2.15.0'),
])
def test_unsupported_versions_say_what_to_install(tf_version, keras_version,
                                                  names):
  with pytest.raises(versions.UnsupportedVersionError) as e:
    versions.check(tf_version, keras_version)
  message = str(e.value)
  assert names in message and '\n' not in message
  assert 'pip install' in message


def test_installed_versions_are_supported():
  versions.check_installed()  # Every CI leg runs a supported set.


def test_broken_tfds_import_names_the_cause(monkeypatch):
  importlib.import_module('tensorflow_datasets')
  # What a protobuf-5 tensorflow-metadata beside protobuf 4 does: the
  # package imports, its core does not.
  monkeypatch.setitem(sys.modules, 'tensorflow_datasets.core', None)
  with pytest.raises(versions.UnsupportedVersionError,
                     match='tensorflow-metadata .*constraints/tf2.16.txt'):
    versions.import_tfds()


def test_tfds_imports():
  assert versions.import_tfds().builder
