"""serve.py's web page: `studio` (requests on a loaded model, no web),
`server` (FastAPI routes) and `static/` (the page: plain HTML, CSS, JS).

May import: everything but training (the top layer).
"""
