"""Fine-tuning on conversations: the chat template they are written with, and what a
checkpoint trained on them carries so that the server's chat route reads it alike.

The template is the one of the checkpoint (or --tokenizer folder) the run takes its
tokenizer from; a model without one gets CHATML, its two markers added to the
tokenizer as special tokens (the model's embedding grows by their rows), the template
written into every checkpoint as chat_template.jinja and `<|im_end|>` made an end of
text in generation_config.json, so that a reply ends with its turn.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from tokenizers import Tokenizer

from model.chat_template import (
    CHATML,
    CHATML_TOKENS,
    TEMPLATE_TOKENS,
    ChatError,
    ChatTemplate,
    compile_chat_template,
    config_token_text,
    shared_start,
    template_source,
    template_tokens,
)
from model.checkpoint import (
    CHAT_TEMPLATE,
    END_OF_TEXT,
    NEW_MODEL_SAMPLING,
    TOKENIZER_CONFIG,
    CheckpointError,
    TokenizerExtras,
    read_json_object,
)
from training.corpus import CorpusError

# The tokenizer_config.json fields a checkpoint holds for the template (save_checkpoint).
NEW_TEMPLATE_CONFIG: dict[str, object] = {"bos_token": END_OF_TEXT, "eos_token": END_OF_TEXT}
# How ChatTemplate.conversation cuts a conversation into tokens, in the token cache's key.
# 2: a later answer's context as the server encodes the history (not cut at turn ends).
CONVERSATION_FORMAT = 2


@dataclass(frozen=True)
class ChatFormat:
    """How conversations become tokens: a chat template (its text, the file it came from
    and the tokenizer_config.json fields it reads) and the special tokens it writes that
    a tokenizer is to be given (CHATML's, for a model that had no template)."""

    path: Path
    template: str
    config: dict[str, object]
    added_tokens: tuple[str, ...] = ()

    def compiled(self, tokenizer: Tokenizer) -> ChatTemplate:
        try:
            return compile_chat_template(self.path, self.template, self.config, tokenizer)
        except CheckpointError as e:
            raise CorpusError(str(e)) from None

    @property
    def key(self) -> str:
        """What of it decides the tokens, for the token cache's key: the template and what
        it reads of tokenizer_config.json (a checkpoint's copy of that file differs from
        the folder's it came from in fields no template reads, and a resumed run's
        tokenizer has the added tokens already)."""
        read = {name: config_token_text(self.config.get(name)) for name in TEMPLATE_TOKENS}
        read |= template_tokens(self.config)  # a model's own named ones too
        read["chat_control_tokens"] = self.config.get("chat_control_tokens")
        return json.dumps([CONVERSATION_FORMAT, self.template, read], sort_keys=True)


def chat_format(folder: Path | None) -> ChatFormat:
    """The chat template of the folder the run's tokenizer comes from (None: a new
    tokenizer, or a tokenizer.json alone), else CHATML with its tokens to add."""
    if folder is not None:
        try:
            config = read_json_object(folder / TOKENIZER_CONFIG)
            found = template_source(folder, config)
        except CheckpointError as e:
            raise CorpusError(str(e)) from None
        if found is not None:
            return ChatFormat(*found, config)
    return ChatFormat(Path(CHAT_TEMPLATE), CHATML, NEW_TEMPLATE_CONFIG, CHATML_TOKENS)


def with_chat_template(extras: TokenizerExtras | None, chat: ChatFormat) -> TokenizerExtras:
    """The tokenizer files every checkpoint of the run keeps, with CHATML where the run
    gave its model that template."""
    extras = extras or TokenizerExtras()
    if not chat.added_tokens:
        return extras  # the template came with the tokenizer's folder, and stays
    return replace(extras, chat_templates=extras.chat_templates | {CHAT_TEMPLATE: chat.template})


def with_end_of_turn(
    defaults: Mapping[str, object] | None, chat: ChatFormat, tokenizer: Tokenizer
) -> Mapping[str, object] | None:
    """Generation settings that also end a reply at the template's end of turn (the last
    special token it writes in an assistant's turn: CHATML's <|im_end|>, Llama 3's
    <|eot_id|>; and, where it differs, that of a turn another message follows: Phi-3's
    <|end|>, before the eos_token it writes after a conversation's last message), where
    `defaults` (None: a new model's) do not already."""
    probe = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    try:
        template = chat.compiled(tokenizer)
        ids, learned = template.conversation(probe)
    except (ChatError, CorpusError):  # a template that refuses the probe: its ends unknown
        return defaults
    special = {i for i, token in tokenizer.get_added_tokens_decoder().items() if token.special}
    last = [i for i, bit in zip(ids, learned, strict=True) if bit and i in special]
    followed = _ends_of_a_followed_turn(template, probe, special)
    settings = dict(NEW_MODEL_SAMPLING if defaults is None else defaults)
    declared = settings.get("eos_token_id")
    declared = declared if isinstance(declared, list) else [] if declared is None else [declared]
    missing = list(dict.fromkeys(ends[-1] for ends in (followed, last) if ends))
    missing = [i for i in missing if i not in declared]
    if not missing:
        return defaults
    settings["eos_token_id"] = [*declared, *missing]
    return settings


def _ends_of_a_followed_turn(
    template: ChatTemplate, probe: list[dict[str, str]], special: set[int]
) -> list[int]:
    """The special tokens `template` writes in the probe's answer where another message
    follows it: the turn's own ends, without what it writes after a conversation's last
    message alone (Phi-3's eos_token after its <|end|>); none where it cannot say."""
    try:
        prompt = template.render(probe[:-1], add_generation_prompt=True)
        through = template.render(probe, add_generation_prompt=False)
        followed = template.render([*probe, probe[0]], add_generation_prompt=False)
    except ChatError:
        return []
    turn = through[: shared_start(through, followed)]
    if not turn.startswith(prompt):
        return []
    return [i for i in template.encode(turn[len(prompt) :]) if i in special]
