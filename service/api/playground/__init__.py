"""The web playground: the page, its static files, and the model files it runs in the browser."""
