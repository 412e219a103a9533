"""The HTTP routes, one router per purpose; every router but health's requires the API key (app.py)."""
