"""The chat page at ``/chat``: one self-contained HTML file (no external scripts, styles or fonts).

It talks to ``/v1/chat/completions`` like any client (streaming, the API key as a bearer token when one is set)
and sends a session id per conversation, so each new turn prefills only its own tokens.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, RedirectResponse

router = APIRouter()


@cache
def page_html() -> str:
    return files("tnlora.serve").joinpath("static/chat.html").read_text(encoding="utf-8")


@router.get("/chat", response_class=HTMLResponse)
async def chat_page() -> HTMLResponse:
    return HTMLResponse(page_html(), headers={"Cache-Control": "no-cache"})


@router.get("/")
async def root() -> RedirectResponse:
    return RedirectResponse("/chat")
