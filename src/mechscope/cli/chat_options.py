"""The chat-prompt options every prompt-taking command shares: ``--chat``, ``--system``,
``--assistant-prefix``, ``--messages`` (see :mod:`mechscope.models.chat`)."""

from __future__ import annotations

import functools

import click

from mechscope.errors import BadInputError
from mechscope.models.chat import ChatPrompt, build_chat_prompt, check_chat_options, load_messages

__all__ = ["chat_options", "ChatRequest"]


class ChatRequest:
    """What the chat options asked for; :meth:`render` turns it into the text the model reads."""

    def __init__(self, chat: bool, system: str | None, assistant_prefix: str | None, messages_file: str | None):
        self.chat, self.system, self.assistant_prefix, self.messages_file = chat, system, assistant_prefix, messages_file

    @property
    def active(self) -> bool:
        return self.chat or self.messages_file is not None

    def check(self, prompt: str | None) -> None:
        """Check the options (before loading a model); messages are read and checked here too.

        Raises:
            BadInputError: a bad combination, a malformed messages file, or no prompt at all.
        """
        check_chat_options(prompt, self.chat, self.system, self.assistant_prefix, self.messages_file)
        if self.messages_file is not None:
            self._messages = load_messages(self.messages_file)
        elif prompt is None or not prompt.strip():
            raise BadInputError("the prompt is empty; give some text (or --messages FILE.json)")

    def render(self, tokenizer, prompt: str | None) -> tuple[str, ChatPrompt | None]:
        """``(text the model reads, the chat prompt or None for plain text)``.

        Raises:
            BadInputError: ``--chat`` on a model without a chat template.
        """
        if not self.active:
            return prompt, None
        chat = build_chat_prompt(tokenizer, prompt, self.system, self.assistant_prefix,
                                 getattr(self, "_messages", None))
        return chat.text, chat


def chat_options(command):
    """Decorator adding the chat options; the command receives one ``chat_request`` argument."""

    @click.option("--chat", is_flag=True,
                  help="Render PROMPT as the user turn with the model's own chat template (generation prompt added).")
    @click.option("--system", default=None, help="System prompt (default: the template's own). Needs --chat.")
    @click.option("--assistant-prefix", default=None,
                  help="Text the assistant turn starts with, to trace a later response token. Needs --chat.")
    @click.option("--messages", "messages_file", default=None, type=click.Path(dir_okay=False),
                  help="A whole conversation as JSON [{\"role\", \"content\"}, ...] instead of PROMPT.")
    @functools.wraps(command)
    def wrapper(*args, chat, system, assistant_prefix, messages_file, **kwargs):
        return command(*args, chat_request=ChatRequest(chat, system, assistant_prefix, messages_file), **kwargs)

    return wrapper
