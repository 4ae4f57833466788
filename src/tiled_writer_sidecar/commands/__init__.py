"""The one-shot commands behind the command line (``cli.py``): `status`, `replay`, `import-backup`, `verify`, `demo`.

Each runs in the process of whoever types it; it may import every layer below.
"""
