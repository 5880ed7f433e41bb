"""``tnlora serve``: an OpenAI-compatible server with continuous batching over recurrent states.

* ``engine.py``: the scheduler that owns the model (prefill, one decode step for all slots, sampling, stops);
* ``sessions.py``: conversation states kept between turns; ``text.py``: streamed text and stop strings;
* ``protocol.py``: the request and response shapes; ``app.py``: the FastAPI app (key, body limit, errors);
* ``openai.py``, ``tutorial.py``, ``page.py``: the routes; ``server.py``: loading and running it all.

Needs the ``serve`` extra (FastAPI, uvicorn): ``pip install 'tnlora[serve]'``.
"""
