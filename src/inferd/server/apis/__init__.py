"""Front APIs translated to and from the engine's chat completions (OpenAI Responses,
Anthropic Messages). Each API is one module with a `Translation` subclass; `server.routes`
names the route that uses it."""
