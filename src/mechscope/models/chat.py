"""Chat-formatted prompts: a conversation rendered with the model's own chat template.

A chat model's decisions (the first refusal token "I" of a reply, a hallucinated answer) happen in
its assistant turn, after the template's special tokens and its default system prompt. mechscope
traces, intervenes on, probes and dreams from the *rendered text*; :class:`ChatPrompt` keeps the
conversation beside it so graphs record both, and marks which tokens are template and which are
the user's words (the explorer shades them).

- ``--chat``: the prompt is the user turn; rendered with ``apply_chat_template(...,
  add_generation_prompt=True)`` and the template's default system prompt unless ``--system``.
- ``--assistant-prefix TEXT``: continues the assistant turn with TEXT, so a later response token
  can be traced (the April 2025 update traces "creating" after "I do not provide advice about").
- ``--messages FILE.json``: a whole conversation, ``[{"role": "system"|"user"|"assistant",
  "content": str}, ...]``; a last assistant message is continued (``continue_final_message``),
  otherwise the generation prompt is added.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from mechscope.errors import BadInputError

__all__ = ["ChatPrompt", "ROLES", "load_messages", "build_chat_prompt", "token_roles"]

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class ChatPrompt:
    """A conversation and its rendering.

    Attributes:
        messages: ``({"role", "content"}, ...)`` as given (system message included when given).
        assistant_prefix: text the assistant turn starts with ("" for none).
        text: the rendered prompt the model reads (template tokens, generation prompt, prefix).
        spans: ``(start, end, role)`` character spans of each message's content and of the prefix
            (role ``assistant``) within ``text``; every other character is template.
    """

    messages: tuple[dict, ...]
    assistant_prefix: str
    text: str
    spans: tuple[tuple[int, int, str], ...] = field(default=())

    def as_dict(self) -> dict:
        """JSON form recorded in graphs (``metadata.chat``)."""
        return {"messages": [dict(m) for m in self.messages], "assistant_prefix": self.assistant_prefix,
                "rendered": self.text}


def _check_messages(messages, source: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise BadInputError(f"{source}: expected a non-empty JSON list of {{\"role\", \"content\"}} messages")
    checked = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or set(m) - {"role", "content"} or "role" not in m or "content" not in m:
            raise BadInputError(f"{source}: message {i} must be an object with exactly 'role' and 'content', got {m!r}")
        if m["role"] not in ROLES:
            raise BadInputError(f"{source}: message {i} has role {m['role']!r}; valid roles: {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise BadInputError(f"{source}: message {i} content must be a string, got {type(m['content']).__name__}")
        if m["role"] == "system" and i != 0:
            raise BadInputError(f"{source}: a system message may only come first (message {i})")
        checked.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "user" for m in checked):
        raise BadInputError(f"{source}: the conversation has no user message")
    return checked


def load_messages(path: str | Path) -> list[dict]:
    """Read and check a messages file.

    Raises:
        BadInputError: missing file, invalid JSON, or a message that is not ``{"role", "content"}``
            with a role in :data:`ROLES`.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise BadInputError(f"messages file {str(path)!r} does not exist") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadInputError(f"messages file {str(path)!r} is not valid JSON: {e}") from e
    return _check_messages(data, f"messages file {str(path)!r}")


def check_chat_options(prompt: str | None, chat: bool, system: str | None, assistant_prefix: str | None,
                       messages_file: str | None) -> None:
    """Check the combination of chat options before any model is loaded.

    Raises:
        BadInputError: ``--assistant-prefix`` or ``--system`` without ``--chat`` / ``--messages``;
            ``--messages`` together with a prompt or ``--chat``.
    """
    if messages_file is not None and (chat or prompt):
        raise BadInputError("--messages gives the whole conversation; leave out PROMPT and --chat")
    if not chat and messages_file is None:
        for flag, value in (("--assistant-prefix", assistant_prefix), ("--system", system)):
            if value is not None:
                raise BadInputError(f"{flag} needs --chat (or --messages FILE.json): it is part of a chat-formatted prompt")


def build_chat_prompt(tokenizer, prompt: str | None = None, system: str | None = None,
                      assistant_prefix: str | None = None, messages: list[dict] | None = None) -> ChatPrompt:
    """Render a chat prompt with the tokenizer's own chat template.

    Args:
        prompt: the user turn (``--chat``); or None with ``messages``.
        system: a system prompt replacing the template's default.
        assistant_prefix: text the assistant turn begins with.
        messages: a whole conversation (``--messages``).

    Raises:
        BadInputError: the tokenizer has no chat template; an empty prompt; malformed messages.
    """
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or "this model"
        raise BadInputError(f"{name} has no chat template, so --chat/--messages cannot render a conversation; "
                            "give the prompt as plain text (without --chat)")
    if messages is None:
        if prompt is None or not prompt.strip():
            raise BadInputError("the prompt is empty; give the user's message")
        messages = [{"role": "user", "content": prompt}]
    messages = _check_messages(list(messages), "the conversation")
    if system is not None:
        messages = [{"role": "system", "content": system}] + [m for m in messages if m["role"] != "system"]
    prefix = assistant_prefix or ""
    continues = messages[-1]["role"] == "assistant"
    if continues and prefix:
        raise BadInputError("--assistant-prefix continues a new assistant turn; the conversation already ends with one")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=not continues,
                                         continue_final_message=continues)
    text += prefix
    return ChatPrompt(tuple(messages), prefix, text, _content_spans(tokenizer, text, messages, prefix))


def _content_spans(tokenizer, text: str, messages: list[dict], prefix: str) -> tuple[tuple[int, int, str], ...]:
    """Where each message's content lies in ``text``: message ``i`` is the last occurrence of its
    content in the rendering of ``messages[: i + 1]`` (a prefix of the full text), so short content
    that also occurs in the template or the system prompt is not matched too early."""
    spans, at = [], 0
    for i, m in enumerate(messages):
        content = m["content"].strip()
        if not content:
            continue
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False, continue_final_message=True) \
            if m["role"] == "assistant" else tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        start = upto.rfind(content) if text.startswith(upto[: max(upto.rfind(content), 0)]) else -1
        if start < at:  # a template that rewrites content or reorders it: search forward instead
            start = text.find(content, at)
        if start < 0:
            continue
        spans.append((start, start + len(content), m["role"]))
        at = start + len(content)
    if prefix:
        spans.append((len(text) - len(prefix), len(text), "assistant"))
    return tuple(spans)


def token_roles(tokenizer, chat: ChatPrompt, n_tokens: int, offset: int = 0) -> list[str]:
    """Role of each prompt token: ``system``, ``user``, ``assistant`` for tokens inside that
    message's content, ``template`` for the chat template's own tokens (special tokens, role
    headers, the default system prompt when it is the template's).

    Args:
        n_tokens: length of the tokenized prompt; ``offset`` tokens at its start (a BOS mechscope
            added) are template.
    """
    enc = tokenizer(chat.text, add_special_tokens=False, return_offsets_mapping=True)
    roles = ["template"] * offset
    for start, end in enc["offset_mapping"]:
        role = "template"
        for s, e, r in chat.spans:
            if start >= s and end <= e and end > start:
                role = r
                break
        roles.append(role)
    return (roles + ["template"] * n_tokens)[:n_tokens]


def chat_metadata(tokenizer, chat: ChatPrompt, input_ids) -> dict:
    """What a graph records of a chat prompt (``metadata.chat``): the messages, the assistant prefix,
    the rendered text and each token's role (:func:`token_roles`) for ``input_ids [pos]`` — the
    tokenized text, with any BOS mechscope prepended."""
    n = len(input_ids)
    offset = n - len(tokenizer(chat.text, add_special_tokens=False).input_ids)
    return {**chat.as_dict(), "token_roles": token_roles(tokenizer, chat, n, offset=max(offset, 0))}


def chat_slug_text(chat: ChatPrompt) -> str:
    """The words a graph of this conversation is named after: the last user message (+ prefix)."""
    user = [m["content"] for m in chat.messages if m["role"] == "user"][-1]
    return f"{user} {chat.assistant_prefix}".strip() + " chat"
