"""A tfds download that cannot succeed: one line in seconds, offline."""

import http.server
import os
import socket
import threading
import time

import ml_collections
import pytest

from sam import download
from sam import input_pipeline


def _closed_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.fixture(name='no_proxy')
def no_proxy_fixture(monkeypatch):
  for name in ('http_proxy', 'https_proxy', 'HTTP_PROXY', 'HTTPS_PROXY',
               'no_proxy', 'NO_PROXY'):
    monkeypatch.delenv(name, raising=False)


def _fails_fast(urls, match, timeout=1.0):
  start = time.monotonic()
  with pytest.raises(input_pipeline.DataNotFoundError, match=match) as e:
    download.check_reachable('cifar10', urls, timeout)
  assert time.monotonic() - start < timeout + 2
  text = str(e.value)
  assert '\n' not in text
  assert 'tfds build cifar10 --data_dir=gs://' in text
  assert '--config.dataset.data_dir=gs://' in text


def test_a_refused_connection(no_proxy):
  del no_proxy
  port = _closed_port()
  _fails_fast([f'http://127.0.0.1:{port}/a.tar.gz'],
              f'^Cannot download cifar10: 127.0.0.1:{port} did not answer '
              r'within 1 s \(.*[Rr]efused')


def test_a_name_that_does_not_resolve(no_proxy):
  del no_proxy
  _fails_fast(['https://data.invalid/a.tar.gz'],
              r'^Cannot download cifar10: data.invalid did not answer')


def test_a_host_that_accepts_and_never_answers(no_proxy):
  del no_proxy
  with socket.create_server(('127.0.0.1', 0)) as silent:  # Never accepts.
    port = silent.getsockname()[1]
    _fails_fast([f'http://127.0.0.1:{port}/a.tar.gz'],
                'did not answer within 1 s .*timed out')


def test_the_proxy_is_named(monkeypatch):
  port = _closed_port()
  monkeypatch.setenv('http_proxy', f'http://127.0.0.1:{port}')
  monkeypatch.delenv('no_proxy', raising=False)
  _fails_fast(['http://example.com/a.tar.gz'],
              f'example.com did not answer through the proxy '
              f'http://127.0.0.1:{port} within 1 s')


class _Truncating(http.server.BaseHTTPRequestHandler):
  """A proxy that answers every file with its first bytes only."""

  def do_HEAD(self):  # pylint: disable=invalid-name
    self.send_response(200)
    self.send_header('Content-Length', '0')
    self.end_headers()

  def do_GET(self):  # pylint: disable=invalid-name
    body = b'\x1f\x8b\x08\x00truncated'
    self.send_response(200)
    self.send_header('Content-Length', str(len(body)))
    self.end_headers()
    self.wfile.write(body)

  def log_message(self, *args):
    del args


def test_a_truncated_archive_is_one_line_and_never_read_as_prepared(
    tmp_path, monkeypatch):
  """tfds itself downloads Fashion-MNIST (plain http) through a proxy that
  cuts every file short; the run says so in one line, and no data set is
  left that reads as prepared."""
  server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), _Truncating)
  server.daemon_threads = True
  threading.Thread(target=server.serve_forever, daemon=True).start()
  monkeypatch.setenv('http_proxy', f'http://127.0.0.1:{server.server_port}')
  monkeypatch.delenv('no_proxy', raising=False)
  dc = ml_collections.ConfigDict({'name': 'fashion_mnist',
                                  'data_dir': str(tmp_path), 'download': True})
  # The server stays up: tfds's other downloads, still running in its
  # threads, end on their own short files (a closed port would have them
  # retry for minutes before the process could exit).
  with pytest.raises(input_pipeline.DataNotFoundError, match=(
      rf'^The download of fashion_mnist into {tmp_path}/fashion_mnist/\S+ '
      r'broke off \(NonMatchingChecksumError: .*'
      'Run the same command to start it again')) as e:
    input_pipeline._tfds(dc)  # pylint: disable=protected-access
  assert '\n' not in str(e.value)
  dc.download = False
  with pytest.raises(input_pipeline.DataNotFoundError,
                     match='tfds has no prepared fashion_mnist'):
    input_pipeline._tfds(dc)  # pylint: disable=protected-access
  assert not any(name.endswith('dataset_info.json')
                 for _, _, files in os.walk(tmp_path) for name in files)
