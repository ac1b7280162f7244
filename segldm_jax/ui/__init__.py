"""serve.py's web page: `studio` (requests on a loaded model, no web),
`server` (FastAPI routes), `guard` (who may drive it: Host, Origin, body
size), `uploads` (pictures read from their header first, names never
paths), `programs` (the compiled programs kept, bounded), `static/` (the
page: plain HTML, CSS, JS), and for tests and benchmarks `headless` (the
page in Chromium) and `probe` (hostile requests).

May import: everything but training (the top layer).
"""
