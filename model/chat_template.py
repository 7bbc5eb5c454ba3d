"""Chat templates: OpenAI-style chat messages -> the prompt's token ids, as transformers'
`apply_chat_template(messages, add_generation_prompt=True, sanitize_control_tokens=True)`
makes them from the same checkpoint folder (a test compares the two).

The template is the checkpoint's `chat_template.jinja` (transformers 5), else the one
its tokenizer_config.json holds (transformers 4: a string, or a list of named ones, of
which "default"). It runs in jinja2's immutable sandbox with the globals, filters and tags
transformers gives it (`raise_exception`, `strftime_now`, a `tojson` that leaves HTML
alone, `{% generation %}`, loop controls), trim_blocks and lstrip_blocks set.

A fine-tune learns a chat from conversations through the same template
(`ChatTemplate.conversation`): the tokens the server's prompt for each assistant turn
leaves to the model are the ones it learns to write. A model without a template gets
CHATML, transformers' ChatML with `{% generation %}` around what the assistant writes.

Control tokens (the tokenizer's special tokens, and the other added tokens the template
writes itself, say `<|im_start|>`, or instead those tokenizer_config.json's
`chat_control_tokens` lists) in what a client sent are read as text: a user cannot
close their own turn and open a forged system one by typing `<|im_end|>`. Each is marked
before the template runs (private-use characters around it), and the rendered text is
encoded piece by piece: a marked token as if the tokenizer had no added tokens, the rest
with its added tokens read as tokens. Markers a client sends are removed first, so that
none can be forged.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import ClassVar

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from model.checkpoint import (
    CHAT_TEMPLATE,
    TOKENIZER_CONFIG,
    CheckpointError,
    read_json_object,
)

# transformers' markers (chat_template_utils): Supplementary Private Use Area-A.
MARK_START, MARK_END = "\U000f0000", "\U000f0001"
# Tokens a template may name besides the messages (transformers passes its
# special_tokens_map): those tokenizer_config.json sets.
TEMPLATE_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token")
TEMPLATE_TOKENS += ("mask_token",)
# The roles a message may have (OpenAI's): what the server's chat route takes, and so
# what a fine-tune's conversations may hold (one in another role could never be prompted).
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


# ChatML (Qwen's and OpenAI's turn markers), the template a fine-tune on conversations gets
# when its model has none; its two markers become special tokens of the tokenizer.
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>\\n' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class ChatError(Exception):
    """Messages the template refused (its raise_exception) or could not render; the
    message says why, for the client's 400."""


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: object,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # jinja2's own tojson escapes <, > and & for HTML, which a prompt is not.
    text = json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )
    # ensure_ascii writes the markers around a client's control token as escapes, which
    # would leave the token unmarked, read as the template's own: they are put back.
    return _ESCAPED_MARKER.sub(_unescaped_marker, text) if ensure_ascii else text


# A marker as json.dumps(ensure_ascii=True) escapes it: a surrogate pair. Its low half's
# escape follows only its high half's (text holds no lone surrogates), so the pattern is
# never a client's escaped backslash followed by text.
_ESCAPED_MARKER = re.compile(r"\\udb80\\udc0([01])")


def _unescaped_marker(match: re.Match[str]) -> str:
    return (MARK_START, MARK_END)[int(match[1])]


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class _GenerationBlocks(jinja2.ext.Extension):
    """transformers' `{% generation %}...{% endgeneration %}`, which marks the assistant's
    text for training masks there: rendered as its body (a template that has it compiled
    nowhere else)."""

    tags: ClassVar[set[str]] = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> list[jinja2.nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _environment() -> ImmutableSandboxedEnvironment:
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[jinja2.ext.loopcontrols, _GenerationBlocks],
    )
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    return environment


def template_source(folder: Path, config: dict[str, object]) -> tuple[Path, str] | None:
    """(the file it is in, the text) of the checkpoint folder's default chat template
    (`config`: its tokenizer_config.json); None if it has none."""
    path = folder / CHAT_TEMPLATE
    if path.is_file():
        try:
            return path, path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: unreadable ({e})") from None
    path = folder / TOKENIZER_CONFIG
    stored = config.get("chat_template")
    if isinstance(stored, list):  # transformers 4's named templates
        stored = next(
            (
                t.get("template")
                for t in stored
                if isinstance(t, dict) and t.get("name") == "default"
            ),
            None,
        )
    if stored is None:
        return None
    if not isinstance(stored, str):
        raise CheckpointError(f"{path}: chat_template is not a template's text")
    return path, stored


def config_token_text(value: object) -> str | None:
    """A tokenizer_config.json token field's text: a string, or an AddedToken's dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


# tokenizer_config.json fields naming a model's own special tokens (name -> token), which
# transformers 5 also passes to a template (its special_tokens_map has them).
NAMED_TOKEN_FIELDS = ("model_specific_special_tokens", "extra_special_tokens")


def template_tokens(config: Mapping[str, object]) -> dict[str, str]:
    """The tokens a chat template may name, from tokenizer_config.json's fields `config`, as
    transformers passes them: TEMPLATE_TOKENS, and a model's own named ones (another
    `<name>_token` field, or one in NAMED_TOKEN_FIELDS given as an object; its
    save_pretrained writes both). Without those, a template's `{{ turn_token }}` wrote
    nothing here, and the prompt was not the one transformers makes."""
    named: dict[str, object] = {k: v for k, v in config.items() if k.endswith("_token")}
    for field in NAMED_TOKEN_FIELDS:
        if isinstance(tokens := config.get(field), Mapping):
            named |= tokens
    named |= {name: config.get(name) for name in TEMPLATE_TOKENS}
    return {name: text for name, value in named.items() if (text := config_token_text(value))}


@dataclass(frozen=True)
class ChatTemplate:
    source: Path  # the file it was read from: chat_template.jinja or tokenizer_config.json
    template: jinja2.Template
    template_tokens: dict[str, str]  # bos_token, eos_token, ...: what the template may use
    control_tokens: re.Pattern[str]  # any control token, the longest first
    special_tokens: re.Pattern[str]  # any special token
    marked: re.Pattern[str]  # a marked control token (group 1), or a lone marker
    tokenizer: Tokenizer  # reads added tokens in text as those tokens

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        """`messages` as the template writes them, their control tokens marked; ChatError if
        the template refuses them."""
        marked = [{key: self._mark(value) for key, value in m.items()} for m in messages]
        try:
            # The tokens first: one a config names "messages" does not replace them.
            return self.template.render(
                {
                    **self.template_tokens,
                    "messages": marked,
                    "add_generation_prompt": add_generation_prompt,
                    "tools": None,
                    "documents": None,
                }
            )
        except Exception as e:  # the template is code: any error is its answer to these messages
            # Its message may quote the messages: as the client wrote them, without markers.
            reason = str(e).replace(MARK_START, "").replace(MARK_END, "")
            raise ChatError(f"the chat template refused the messages: {reason}") from None

    def conversation(
        self, messages: list[dict[str, str]], not_learned: Collection[int] = ()
    ) -> tuple[list[int], list[int]]:
        """(ids, learned) of a whole conversation: its token ids, and 1 where the model
        learns the token (an assistant's turn, but those whose index is in `not_learned`:
        what follows the prompt the server makes of the messages before it, through the
        template's end of that turn), else 0. A ChatError where the template refuses the
        messages, prompts for an assistant's turn otherwise than it writes its start, or
        writes a turn otherwise once later ones follow (which tokens the assistant wrote is
        then unknown)."""
        full = self.render(messages, add_generation_prompt=False)
        # The rendered text cut where each learned reply starts, each stretch encoded alone:
        # a reply's tokens follow its prompt's as the server's prompt leaves them to the
        # model, however the tokenizer would merge across. Not where a reply's turn ends:
        # a later answer's server reads the history whole, and a blank line before the next
        # turn's text is not the one token it is at a piece's end. Of a stretch, the tokens
        # learned are those it shares with the turn encoded alone (a token across the turn's
        # end is of what follows).
        turns: dict[int, int] = {}  # where a learned reply starts: where its turn ends
        for turn, message in enumerate(messages):
            if message["role"] != "assistant" or turn in not_learned:
                continue
            prompt = self.render(messages[:turn], add_generation_prompt=True)
            through = self.render(messages[: turn + 1], add_generation_prompt=False)
            if not through.startswith(prompt):
                raise ChatError(
                    f"the chat template's prompt for message {turn + 1} (the assistant's) is not "
                    "how it writes that message's start, so which tokens the assistant wrote is "
                    "unknown"
                )
            if not full.startswith(through):
                raise ChatError(
                    f"the chat template writes message {turn + 1} (the assistant's) otherwise "
                    "once more messages follow, so which tokens the assistant wrote is unknown"
                )
            turns[len(prompt)] = len(through)
        ids: list[int] = []
        learned: list[int] = []
        bounds = sorted({0, *turns, len(full)})
        for start, end in itertools.pairwise(bounds):
            piece = self._piece(full[start:end], start)
            shared = 0
            if start in turns:
                shared = shared_start(piece, self._piece(full[start : turns[start]], start))
            ids += piece
            learned += [1] * shared + [0] * (len(piece) - shared)
        return ids, learned

    def _piece(self, text: str, start: int) -> list[int]:
        """`text`'s ids as a piece of a rendered chat starting at character `start`."""
        return self.encode(text) if start == 0 else self._continuing(text)

    def _continuing(self, text: str) -> list[int]:
        """`text`'s ids as a piece after other text (encode's way for its later pieces)."""
        newline = self._with_added_tokens("\n")
        ids = self.encode("\n" + text)
        return ids[len(newline) :] if ids[: len(newline)] == newline else self.encode(text)

    def ordinary_text(self, rendered: str) -> str:
        """`rendered` without its markers and the special tokens `encode` reads as tokens:
        text of at most as many bytes as its tokens spell (such a token is one token, and
        spells none; a marked one, a client's, is read as text and spells its bytes), so
        that a prompt too long by its bytes is refused before it is encoded."""
        # As `encode` splits it: [text, marked token, text, ...], None for a lone marker.
        pieces = self.marked.split(rendered)
        return "".join(
            piece if i % 2 else self.special_tokens.sub("", piece)
            for i, piece in enumerate(pieces)
            if piece
        )

    def encode(self, rendered: str) -> list[int]:
        """The token ids of a rendered chat: its marked control tokens as text, the rest
        with its added tokens read as those tokens."""
        # Pieces between markers: [text, marked token, text, ...], where a lone marker (a
        # template that split a marked token) stands for no token, yet breaks the text.
        pieces = self.marked.split(rendered)
        newline = self._with_added_tokens("\n")
        ids = self._with_added_tokens(pieces[0])
        for i, piece in enumerate(pieces[1:], start=1):
            if not piece:
                continue
            as_text = i % 2 == 1
            encode = self._as_text if as_text else self._with_added_tokens
            # After a newline, then without it: a piece encoded from the middle of the text,
            # as transformers does (a SentencePiece tokenizer would add a space at a start).
            piece_ids = encode("\n" + piece)
            if piece_ids[: len(newline)] == newline:
                piece_ids = piece_ids[len(newline) :]
            else:
                piece_ids = encode(piece)
            if as_text and self.tokenizer.token_to_id(piece) in piece_ids:
                raise ChatError(f"{piece!r} in a message: this tokenizer cannot read it as text")
            ids += piece_ids
        return ids

    def _with_added_tokens(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def _as_text(self, text: str) -> list[int]:
        """`text`'s ids as if the tokenizer had no added tokens, special or not: its
        normalizer, pre-tokenizer and model alone (transformers' way too)."""
        tokenizer = self.tokenizer
        if tokenizer.normalizer is not None:
            text = tokenizer.normalizer.normalize_str(text)
        splits = [text]
        if tokenizer.pre_tokenizer is not None:
            splits = [split for split, _ in tokenizer.pre_tokenizer.pre_tokenize_str(text)]
        return [token.id for split in splits for token in tokenizer.model.tokenize(split)]

    def _mark(self, text: str) -> str:
        text = text.replace(MARK_START, "").replace(MARK_END, "")
        return self.control_tokens.sub(f"{MARK_START}\\g<0>{MARK_END}", text)


def shared_start(a: Sequence[object], b: Sequence[object]) -> int:
    """How many items `a` and `b` start with alike."""
    return next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )


def load_chat_template(folder: Path, served: Tokenizer) -> ChatTemplate | None:
    """The checkpoint folder's chat template for its tokenizer (`served`: the server's,
    left as it is); None without one; a CheckpointError naming the file for one jinja2
    cannot compile."""
    config = read_json_object(folder / TOKENIZER_CONFIG)
    source = template_source(folder, config)
    if source is None:
        return None
    path, text = source
    return compile_chat_template(path, text, config, served)


def compile_chat_template(
    path: Path, text: str, config: dict[str, object], served: Tokenizer
) -> ChatTemplate:
    """The chat template `text` (from the file at `path`, named in errors) for the
    tokenizer `served` (left as it is), `config` its tokenizer_config.json's fields; a
    CheckpointError for one jinja2 cannot compile."""
    environment = _environment()
    try:
        template = environment.from_string(text)
        syntax = environment.parse(text)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise CheckpointError(f"{path}: chat template line {e.lineno}: {e.message}") from None
    # The literal text the template writes: its own text and its string constants, apart
    # (so that no token is found across two of them).
    written = {node.data for node in syntax.find_all(jinja2.nodes.TemplateData)}
    written |= {n.value for n in syntax.find_all(jinja2.nodes.Const) if isinstance(n.value, str)}
    written_text = "\0".join(written)
    added = served.get_added_tokens_decoder().values()
    listed = config.get("chat_control_tokens")  # transformers 5's: the tokens, if it names them
    if listed is None:  # whitespace tokens (Gemma's "\n") are ordinary text in a template
        control = [
            t.content for t in added if t.content in written_text and not t.content.isspace()
        ]
    elif isinstance(listed, list) and all(isinstance(token, str) for token in listed):
        control = [token.content for token in added if token.content in listed]
    else:
        config_path = path.parent / TOKENIZER_CONFIG
        raise CheckpointError(f"{config_path}: chat_control_tokens is not a list of tokens")
    control += [token.content for token in added if token.special]
    control_tokens = _any_of(control)
    special_tokens = _any_of(token.content for token in added if token.special)
    marked = re.compile(
        f"{MARK_START}({control_tokens.pattern}){MARK_END}|[{MARK_START}{MARK_END}]"
    )
    tokenizer = Tokenizer.from_str(served.to_str())  # `served` left to read them as text
    tokenizer.encode_special_tokens = False
    return ChatTemplate(
        path, template, template_tokens(config), control_tokens, special_tokens, marked, tokenizer
    )


def _any_of(tokens: Iterable[str]) -> re.Pattern[str]:
    """A regex matching any of `tokens`, the longest first (a token before those it holds);
    one that never matches for none."""
    longest_first = sorted(tokens, key=len, reverse=True)
    return re.compile("|".join(map(re.escape, longest_first)) or "(?!)")
