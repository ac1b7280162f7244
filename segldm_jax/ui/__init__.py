"""serve.py's web page: `studio` (requests on a loaded model, no web),
`server` (FastAPI routes) and `static/` (the page: plain HTML, CSS, JS)."""
