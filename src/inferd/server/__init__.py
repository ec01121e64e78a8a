"""The front: the ASGI app, proxying to engines, supervision, error mapping."""
