"""The WSGI entry for gunicorn: the only module that builds an app at import."""
from gevent import monkey

# First, before anything creates a lock: a lock made before patching froze a
# whole worker here once. gunicorn's gevent worker patches too; twice is harmless.
monkey.patch_all()

from server import create_app  # noqa: E402

app = create_app()
