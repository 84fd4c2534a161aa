"""A tfds download that cannot succeed fails in seconds, in one line.

Without network, `download_and_prepare` retries for minutes (3 min 30 s seen
for CIFAR-10) and ends in a traceback. So each host the data set is fetched
from is asked first, bounded in time (through the proxy the environment
names, as the download would be); a download that breaks off later is one
line too. tfds downloads into temporary files and prepares into an
`.incomplete` directory that it renames when done, so a broken download
never leaves a data set that reads as complete, and the next run starts it
again.
"""

import urllib.error
import urllib.parse
import urllib.request

from sam import streaming

# Seconds to wait for a host to answer (connect and first response).
TIMEOUT_SECS = 10.0


def _where(name: str) -> str:
  return (f'Prepare it where there is network (`tfds build {name} '
          '--data_dir=gs://BUCKET/tensorflow_datasets`, or copy a prepared '
          'tensorflow_datasets directory there) and pass '
          '--config.dataset.data_dir=gs://BUCKET/tensorflow_datasets.')


def _proxy(url: str) -> str:
  proxy = urllib.request.getproxies().get(urllib.parse.urlsplit(url).scheme)
  if not proxy or urllib.request.proxy_bypass(urllib.parse.urlsplit(
      url).hostname or ''):
    return ''
  return f' through the proxy {proxy}'


def check_reachable(name: str, urls: list[str],
                    timeout: float = TIMEOUT_SECS) -> None:
  """Raises DataNotFoundError, in one line, if a host of `urls` is silent.

  Any HTTP answer counts: the host is there (the download says the rest).
  """
  hosts = {}
  for url in urls:
    hosts.setdefault(urllib.parse.urlsplit(url).netloc, url)
  for host, url in hosts.items():
    try:
      # A new opener: it reads the proxy settings now (urlopen's is cached).
      urllib.request.build_opener().open(
          urllib.request.Request(url, method='HEAD'), timeout=timeout).close()
    except urllib.error.HTTPError:
      pass
    except (OSError, ValueError) as e:
      reason = getattr(e, 'reason', e)
      raise streaming.DataNotFoundError(
          f'Cannot download {name}: {host} did not answer{_proxy(url)} '
          f'within {timeout:g} s ({reason}). {_where(name)}') from None


def prepare(builder, name: str) -> None:
  """Downloads and prepares the tfds data set of `builder`, or one line."""
  check_reachable(name, sorted(builder.url_infos or ()))
  try:
    builder.download_and_prepare()
  except Exception as e:  # pylint: disable=broad-except
    # requests' errors, tfds' checksum errors, a truncated archive: all
    # with a traceback that hides the one thing to do.
    first = (str(e).strip().splitlines() or [''])[0][:300]
    raise streaming.DataNotFoundError(
        f'The download of {name} into {builder.data_dir} '
        f'broke off ({type(e).__name__}: {first}). Run the same command to '
        f'start it again, or: {_where(name)}') from None
