"""The OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, /v1/models), as vLLM serves it.

It runs in the coordinator's process and event loop and calls the same domain call as the gRPC Generate
(CoordinatorServicer.generate): one concurrency limit, one set of metrics, one validation. A body becomes
GenerateRequests (requests.py; tools and tool_choice in tools.py), their chunks become OpenAI's objects or
server-sent events (responses.py; a reasoning model's thinking split off in reasoning.py), and domain errors
become HTTP statuses with OpenAI's error body (server.py).
"""
