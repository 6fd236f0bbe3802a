"""Recorded-frame conformance: replay ext_proc streams against a server.

The recordings themselves (format and recorder) live in extproc/recorder.py, on the
serving side, because `serve --record-dir` writes them.
"""
