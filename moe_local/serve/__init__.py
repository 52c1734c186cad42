"""``moe-local serve``: an OpenAI-compatible HTTP server for one loaded model and its named router adapters.

The pieces, each in its own module:

- ``schema``: the OpenAI request bodies (validated, strict types) and the response, chunk and error shapes.
- ``prompts``: what a request asks of the model: the adapter its ``model`` names, the prompt's token ids
  (chat messages through the chat template, completions as given), sampling, stop strings.
- ``adapters``: named adapters read and checked against the model once; their gates swapped in for
  one request and the base gates restored after it, whatever happens.
- ``jobs``: the bounded arrival-order queue and the one thread that owns the model and runs the jobs.
- ``app``: the FastAPI routes, OpenAI-style errors, server-sent events, disconnects.
- ``server``: the listening socket, uvicorn, the ready line and Ctrl-C.

Only ``app`` and ``server`` import FastAPI and uvicorn (the ``serve`` extra); the rest of the package
never imports this subpackage.
"""
