"""Engine: the model thread, per-request output queues, cancellation.

`submit()` (event-loop thread) registers a request with the scheduler and returns a
`RequestStream`, an async iterator over that request's `RequestOutput`s. The model
thread loops: apply cancellations, `schedule()`, run the step (slot moves and a shared
prompt's copies, one batched decode for every running row, one padded prefill for this
step's prompt chunks), sample, detokenize, `update_from_output()`, then hand the step's outputs
to the event loop with a single `loop.call_soon_threadsafe`.

Threading: the scheduler is guarded by `_cond` (held only for bookkeeping, never
during a forward); everything else on the model side is touched by the model
thread alone. A closed stream cancels its request: one still waiting leaves the
queue at once (it has nothing on the model side); a running one the model thread
releases before its next step, which frees the slot.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from model.transformer import Transformer
from server.detokenizer import IncrementalDetokenizer, text_offsets
from server.metrics import Metrics
from server.runner import ModelRunner, PrefillInput
from server.sampler import Sampler, SamplingBatch, make_generator
from server.scheduler import PrefillChunk, ScheduledRequest, Scheduler, SchedulerOutput
from server.validation import GenerationRequest

log = logging.getLogger(__name__)


class EngineUnavailable(Exception):
    """The engine is draining, stopped or failed, and admits nothing new."""


FAILED = "the engine stopped on an internal error (see the server log)"
# A request shares the prefill of an earlier one whose prompt begins with the same this
# many tokens: a shorter common prefix (a shorter prompt) is computed, not waited for
# (the request waits in its slot while its source prefills).
MIN_SHARED_PREFIX = 16


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """A token's log-probability under the model, and the likeliest at its position."""

    token_id: int
    logprob: float | None  # None: the first token of an echoed prompt (nothing before it)
    top: tuple[tuple[int, float], ...] | None  # (id, log-probability), likeliest first
    text_offset: int  # where its text begins in the request's text (echo included)


# A token's log-probability and its position's likeliest (id, log-probability).
_Scores = tuple[float, tuple[tuple[int, float], ...]]


@dataclass(frozen=True, slots=True)
class RequestOutput:
    """What one step produced for one request."""

    request_id: str
    text: str  # delta since the previous output
    token_ids: list[int]
    finish_reason: str | None  # "stop" | "length" on the last output
    prompt_tokens: int
    completion_tokens: int
    stop_string: str | None = None  # the stop string that ended the text (finish "stop")
    logprobs: tuple[TokenLogprob, ...] = ()  # one per token id, if the request asked
    error: Exception | None = None  # set (and last) when the engine failed the request

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None or self.error is not None

    def followed_by(self, later: RequestOutput) -> RequestOutput:
        """This output and a later step's of the same request (not an error), as one."""
        return RequestOutput(
            self.request_id,
            self.text + later.text,
            self.token_ids + later.token_ids,
            later.finish_reason,
            later.prompt_tokens,
            later.completion_tokens,
            later.stop_string,
            self.logprobs + later.logprobs,
        )


class RequestStream:
    """Async iterator over one request's outputs, one per engine step; `close()` cancels
    an unfinished one."""

    def __init__(self, request: GenerationRequest, engine: Engine) -> None:
        self.request = request
        self.queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self._engine = engine
        self._done = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        output = await self.queue.get()
        self._done = output.finished
        return output

    def close(self) -> None:
        if not self._done:
            self._done = True
            self._engine.cancel(self.request.request_id)


@dataclass
class _Live:
    """Model-thread state of one submitted request."""

    request: GenerationRequest
    stream: RequestStream
    detokenizer: IncrementalDetokenizer
    generator: torch.Generator | None
    last_token: int = -1
    num_generated: int = 0
    last_token_at: float = 0.0
    prompt_scores: list[_Scores] = field(default_factory=list)  # prompt tokens 1, 2, ...


class Engine:
    def __init__(
        self,
        model: Transformer,
        token_table: list[bytes],
        *,
        end_ids: frozenset[int],
        n_slots: int,
        max_queue: int,
        prefill_chunk: int,
        metrics: Metrics,
        compile_decode: bool = False,
        cuda_graphs: bool = False,
    ) -> None:
        self.runner = ModelRunner(
            model, n_slots, compile_decode=compile_decode, cuda_graphs=cuda_graphs
        )
        self.token_table = token_table  # id -> its bytes (model.token_bytes)
        # Draws only ids the tokenizer has: a padded or converted checkpoint may have more
        # embedding rows than tokens (load_tokenizer allows that), and those have no text.
        self.sampler = Sampler(n_slots, len(self.token_table), self.runner.device)
        self.scheduler = Scheduler(n_slots, max_queue, prefill_chunk)
        self.metrics = metrics
        self.end_ids = end_ids  # a token among these ends the text (unless ignore_eos)
        self._live: dict[str, _Live] = {}
        # The latest request submitted with each prompt start (MIN_SHARED_PREFIX tokens):
        # the source a request with the same start copies its common prefix from.
        self._by_prompt_start: dict[tuple[int, ...], GenerationRequest] = {}
        self._cancelled: set[str] = set()
        self._cond = threading.Condition()
        self._stopping = False
        self._draining = False
        self._failed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._decode_key: tuple[tuple[str, int], ...] = ()
        self._decode_batch: SamplingBatch | None = None

    # ------------------------------------------------------------ event-loop side

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name="pocketgpt-engine", daemon=True)
        self._thread.start()

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def failed(self) -> bool:
        """The model thread stopped on an unexpected error: nothing more is served."""
        return self._failed

    @property
    def num_unfinished(self) -> int:
        return len(self._live)

    def submit(self, request: GenerationRequest) -> RequestStream:
        """Queue `request`; raises EngineUnavailable, or QueueFull past the queue bound."""
        return self.submit_all([request])[0]

    def submit_all(self, requests: Sequence[GenerationRequest]) -> list[RequestStream]:
        """Queue `requests`, all or none (as submit() raises); their streams, in order."""
        lives = [
            _Live(
                request,
                RequestStream(request, self),
                IncrementalDetokenizer(self.token_table, request.stop),
                make_generator(request.seed, self.runner.device),
            )
            for request in requests
        ]
        with self._cond:
            if self._failed:
                raise EngineUnavailable(FAILED)
            if self._draining or self._stopping:
                raise EngineUnavailable("the server is shutting down")
            scheduled, starts = self._scheduled(requests)
            self.scheduler.add(*scheduled)
            for live in lives:
                self._live[live.request.request_id] = live
            self._by_prompt_start.update(starts)
            self.metrics.waiting.set(self.scheduler.num_waiting)
            self._cond.notify()
        return [live.stream for live in lives]

    def _scheduled(
        self, requests: Sequence[GenerationRequest]
    ) -> tuple[list[ScheduledRequest], dict[tuple[int, ...], GenerationRequest]]:
        """The scheduler's view of `requests` (submitted together, in order): each copies
        the prompt prefix it has in common with the latest live request submitted before
        it whose prompt starts with the same MIN_SHARED_PREFIX tokens, one of these
        included (n choices of one prompt); a request scoring its prompt computes every
        position's logits itself. And the prompt starts `requests` are then the latest of."""
        if len(self._by_prompt_start) > 2 * self.scheduler.capacity:  # the finished forgotten
            self._by_prompt_start = {
                start: request
                for start, request in self._by_prompt_start.items()
                if request.request_id in self._live
            }
        starts: dict[tuple[int, ...], GenerationRequest] = {}
        scheduled = []
        for request in requests:
            prompt = request.prompt_ids
            if len(prompt) <= MIN_SHARED_PREFIX:  # it would copy less than that
                scheduled.append(ScheduledRequest(request.request_id, len(prompt)))
                continue
            start = tuple(prompt[:MIN_SHARED_PREFIX])
            source = starts.get(start)
            if source is None:
                source = self._by_prompt_start.get(start)
                if source is not None and source.request_id not in self._live:
                    source = None  # finished or cancelled: nothing to copy
            shared = 0
            if source is not None and not request.scores_prompt:
                shared = min(_common_prefix(prompt, source.prompt_ids), len(prompt) - 1)
            source_id = source.request_id if source is not None and shared > 0 else None
            scheduled.append(
                ScheduledRequest(
                    request.request_id,
                    len(prompt),
                    source_id,
                    shared,
                    ends_with_prompt=request.max_tokens <= 1,
                )
            )
            starts[start] = request
        return scheduled, starts

    def cancel(self, request_id: str) -> None:
        with self._cond:
            # A request still waiting has nothing on the model side: it leaves the queue
            # now. Left to the model thread's next step, it kept its place against the
            # queue bound after its client had gone, and the next client got a 429.
            # (Not once stopped or failed: _fail_unfinished has answered it already.)
            if not (self._stopping or self._failed) and self.scheduler.cancel_waiting(request_id):
                self._live.pop(request_id, None)
                self.metrics.finished.labels("cancelled").inc()
                self.metrics.waiting.set(self.scheduler.num_waiting)
                return
            self._cancelled.add(request_id)
            self._cond.notify()

    def begin_drain(self) -> None:
        """Admit nothing new; requests already submitted run to completion."""
        self._draining = True

    async def wait_idle(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self._live and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return not self._live

    def stop(self) -> None:
        """Stop the model thread; requests still unfinished get an error output."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()
        self._fail_unfinished(EngineUnavailable("the server shut down"))

    def _fail_unfinished(self, error: Exception) -> None:
        """Every submitted, unfinished request gets `error` as its last output."""
        with self._cond:
            failed, self._live = list(self._live.values()), {}
        self._publish([(live.stream, self._failure(live, error)) for live in failed])
        self.metrics.finished.labels("error").inc(len(failed))
        # No step runs again to update the gauges: left as they were, a failed engine's
        # /metrics went on showing its last requests running and waiting, its cache in use.
        self.metrics.running.set(0)
        self.metrics.waiting.set(0)
        self.metrics.kv_cache_usage.set(0)

    # ------------------------------------------------------------ model thread

    def _run(self) -> None:
        try:
            self._serve()
        except BaseException as e:  # a bug outside any one step: no request may hang on it
            log.exception("the engine stopped")
            with self._cond:
                self._failed = True
            self._fail_unfinished(EngineUnavailable(FAILED))
            if not isinstance(e, Exception):
                raise

    def _serve(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not (self._stopping or self._cancelled or self.scheduler.has_work):
                        self._cond.wait()
                    if self._stopping:
                        return
                    self._apply_cancellations()
                    output = self.scheduler.schedule()
                    self._update_gauges()
                if output.is_empty:
                    continue
                try:
                    finished, deliveries = self._execute(output)
                except Exception as e:  # a bug or device failure: fail this step's requests
                    log.exception("engine step failed")
                    if self.runner.device_lost():
                        raise  # every later step would fail too: the engine stops (_run)
                    finished, deliveries = self._fail_step(output, e)
                with self._cond:
                    self.scheduler.update_from_output(output, finished)
                    self._update_gauges()
                self._publish(deliveries)

    def _apply_cancellations(self) -> None:
        for request_id in self._cancelled:
            if self.scheduler.cancel(request_id):
                self._live.pop(request_id, None)
                self.metrics.finished.labels("cancelled").inc()
        self._cancelled.clear()

    def _update_gauges(self) -> None:
        running = self.scheduler.num_running
        self.metrics.running.set(running)
        self.metrics.waiting.set(self.scheduler.num_waiting)
        self.metrics.kv_cache_usage.set(running / self.scheduler.n_slots)

    def _execute(
        self, output: SchedulerOutput
    ) -> tuple[list[str], list[tuple[RequestStream, RequestOutput]]]:
        for move in output.moves:
            self.runner.copy_slot(move.src, move.dst, move.length)
            self.sampler.move(move.src, move.dst)
        for copy in output.copies:  # the sampler's state: Sampler.start, as the prompt ends
            self.runner.copy_slot(copy.src, copy.dst, copy.length)
            self.metrics.prompt_tokens_shared.inc(copy.length)
        now = time.perf_counter()
        for request_id in output.admitted:
            request = self._live[request_id].request
            self.metrics.queue_time.observe(now - request.arrival)
            self.metrics.prompt_tokens.inc(len(request.prompt_ids))

        rows: list[_Live] = []
        sampled: list[torch.Tensor] = []
        scored: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = []  # _logprobs
        if output.decodes:
            lives = [self._live[row.request_id] for row in output.decodes]
            batch = self._decode_sampling(output, lives)
            logits = self.runner.decode(
                [live.last_token for live in lives],
                [row.position for row in output.decodes],
                [row.slot for row in output.decodes],
            )
            sampled.append(ids := self.sampler.sample(logits, batch))
            if batch.top_logprobs is not None:
                scored.append((len(rows), *self.sampler.logprobs(logits, ids, batch.top_logprobs)))
            rows += lives
            self.metrics.batch_size.observe(len(lives))
        scored_only: list[_Live] = []  # prompts complete, nothing to generate (max_tokens 0)
        if output.prefills:
            lives = [self._live[chunk.request_id] for chunk in output.prefills]
            chunks = [
                PrefillInput(
                    c.slot,
                    live.request.prompt_ids[c.start : c.end],
                    c.start,
                    every_position=live.request.scores_prompt,
                )
                for c, live in zip(output.prefills, lives, strict=True)
            ]
            logits = self.runner.prefill(chunks)  # [P, V], or more rows when scoring
            if any(chunk.every_position for chunk in chunks):
                counts = [len(c.token_ids) if c.every_position else 1 for c in chunks]
                self._score_prompts(output.prefills, lives, logits.split(counts))
                logits = logits[torch.tensor(counts).cumsum(0) - 1]  # [P, V]: each chunk's end
            completed = [i for i, c in enumerate(output.prefills) if c.completes_prompt]
            scored_only = [lives[i] for i in completed if not lives[i].request.max_tokens]
            done = [i for i in completed if lives[i].request.max_tokens]
            if done:
                starting = [lives[i] for i in done]
                slots = [output.prefills[i].slot for i in done]
                for slot, live in zip(slots, starting, strict=True):
                    self.sampler.start(slot, live.request.prompt_ids)
                batch = self.sampler.batch(
                    slots,
                    [live.request.sampling for live in starting],
                    [live.generator for live in starting],
                    [live.request.logprobs for live in starting],
                )
                last_logits = logits[done]  # [len(done), V]: a gather, taken once
                sampled.append(ids := self.sampler.sample(last_logits, batch))
                if batch.top_logprobs is not None:
                    top = batch.top_logprobs
                    scored.append((len(rows), *self.sampler.logprobs(last_logits, ids, top)))
                rows += starting

        token_ids = torch.cat(sampled).tolist() if rows else []  # the step's one device sync
        now = time.perf_counter()
        self.metrics.generation_tokens.inc(len(token_ids))
        logprobs = self._logprobs(rows, scored)
        steps: list[tuple[_Live, int | None, _Scores | None]] = [
            (live, None, None) for live in scored_only
        ]
        steps += zip(rows, token_ids, logprobs, strict=True)
        finished, deliveries = [], []
        for live, token_id, scores in steps:
            try:
                if token_id is None:
                    out = self._prompt_only(live)
                else:
                    out = self._advance(live, token_id, now, scores)
            except Exception as e:  # a bug in this row's text must not fail its neighbours
                log.exception("request %s failed", live.request.request_id)
                out = self._failure(live, e)
            deliveries.append((live.stream, out))
            if out.finished:
                finished.append(out.request_id)
                del self._live[out.request_id]
                self.metrics.finished.labels(out.finish_reason or "error").inc()
                self.metrics.request_latency.observe(now - live.request.arrival)
        return finished, deliveries

    @staticmethod
    def _logprobs(
        rows: list[_Live], scored: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]
    ) -> list[_Scores | None]:
        """Each row's sampled token's log-probability and its likeliest alternatives, as
        many as it asked for; None where it asked for none. `scored`: Sampler.logprobs'
        tensors for the rows from an index on (copied from the device only when asked)."""
        logprobs: list[_Scores | None] = [None] * len(rows)
        for first, *tensors in scored:
            asked = [live.request.logprobs for live in rows[first : first + len(tensors[0])]]
            for row, (k, scores) in enumerate(zip(asked, _scores(*tensors, asked), strict=True)):
                if k is not None:
                    logprobs[first + row] = scores
        return logprobs

    def _decode_sampling(self, output: SchedulerOutput, lives: list[_Live]) -> SamplingBatch:
        """The decode batch's sampling tensors, rebuilt only when its rows or slots change."""
        key = tuple((row.request_id, row.slot) for row in output.decodes)
        if key != self._decode_key or self._decode_batch is None:
            self._decode_batch = self.sampler.batch(
                [row.slot for row in output.decodes],
                [live.request.sampling for live in lives],
                [live.generator for live in lives],
                [live.request.logprobs for live in lives],
            )
            self._decode_key = key
        return self._decode_batch

    def _advance(
        self,
        live: _Live,
        token_id: int,
        now: float,
        scores: _Scores | None,
    ) -> RequestOutput:
        request = live.request
        live.num_generated += 1
        echo, echo_logprobs = "", ()
        if live.num_generated == 1:
            self.metrics.time_to_first_token.observe(now - request.arrival)
            echo, echo_logprobs = self._echo(live)
        else:
            self.metrics.inter_token_latency.observe(now - live.last_token_at)
        live.last_token, live.last_token_at = token_id, now
        reason = None
        if token_id in self.end_ids and not request.ignore_eos:
            text, reason = live.detokenizer.finish(), "stop"
            # After the text: the U+FFFD its end made of bytes held from before included.
            text_offset = live.detokenizer.decoded_length
        else:
            text = live.detokenizer.add(token_id)
            text_offset = live.detokenizer.token_offset
            if live.detokenizer.stop_string is not None:
                reason = "stop"
            elif live.num_generated >= request.max_tokens:
                text += live.detokenizer.finish()
                # The flush can complete a stop string (bytes it makes U+FFFD).
                reason = "length" if live.detokenizer.stop_string is None else "stop"
        logprobs = echo_logprobs
        if scores is not None:
            text_offset += len(request.echo or "")
            logprobs += (TokenLogprob(token_id, *scores, text_offset=text_offset),)
        return RequestOutput(
            request.request_id,
            echo + text,
            [token_id],
            reason,
            len(request.prompt_ids),
            live.num_generated,
            live.detokenizer.stop_string,
            logprobs,
        )

    def _prompt_only(self, live: _Live) -> RequestOutput:
        """The one output of a request that generates nothing (max_tokens 0): its echo."""
        echo, logprobs = self._echo(live)
        prompt_tokens = len(live.request.prompt_ids)
        return RequestOutput(
            live.request.request_id, echo, [], "length", prompt_tokens, 0, None, logprobs
        )

    def _echo(self, live: _Live) -> tuple[str, tuple[TokenLogprob, ...]]:
        """What a request's first output begins with: its echo (if asked) and, scoring the
        prompt, each prompt token's log-probability (the first's None)."""
        request = live.request
        if not request.scores_prompt:
            return request.echo or "", ()
        prompt = request.prompt_ids
        offsets = text_offsets(self.token_table, prompt)
        scored = zip(prompt[1:], live.prompt_scores, offsets[1:], strict=True)
        return request.echo or "", (
            TokenLogprob(prompt[0], None, None, 0),
            *(TokenLogprob(t, *scores, text_offset=offset) for t, scores, offset in scored),
        )

    def _score_prompts(
        self,
        chunks: Sequence[PrefillChunk],
        lives: list[_Live],
        logits: Sequence[torch.Tensor],
    ) -> None:
        """Keep, for each request scoring its prompt, its chunk's prompt tokens'
        log-probabilities. logits[p]: chunk p's, [its length, V] if its request scores
        its prompt; row j is prompt position start + j, whose logits score prompt token
        start + j + 1 (the last prompt position's score the first generated token)."""
        rows, targets, owners = [], [], []
        for row, (chunk, live) in enumerate(zip(chunks, lives, strict=True)):
            prompt = live.request.prompt_ids
            scored = min(chunk.end, len(prompt) - 1) - chunk.start
            if live.request.scores_prompt and scored > 0:
                rows.append(logits[row][:scored])
                targets += prompt[chunk.start + 1 : chunk.start + 1 + scored]
                owners.append((live, scored))
        if not owners:
            return
        asked = [live.request.logprobs for live, scored in owners for _ in range(scored)]
        ids = torch.tensor(targets, device=self.runner.device)
        tensors = self.sampler.logprobs(torch.cat(rows), ids, max(k or 0 for k in asked))
        scores = iter(_scores(*tensors, asked))
        for live, scored in owners:
            live.prompt_scores += itertools.islice(scores, scored)

    def _fail_step(
        self, output: SchedulerOutput, error: Exception
    ) -> tuple[list[str], list[tuple[RequestStream, RequestOutput]]]:
        self._decode_key, self._decode_batch = (), None
        ids = {row.request_id for row in output.decodes}
        ids |= {chunk.request_id for chunk in output.prefills}
        deliveries = []
        for request_id in ids:
            live = self._live.pop(request_id)
            deliveries.append((live.stream, self._failure(live, error)))
            self.metrics.finished.labels("error").inc()
        return list(ids), deliveries

    @staticmethod
    def _failure(live: _Live, error: Exception) -> RequestOutput:
        return RequestOutput(
            live.request.request_id,
            "",
            [],
            None,
            len(live.request.prompt_ids),
            live.num_generated,
            error=error,
        )

    def _publish(self, deliveries: list[tuple[RequestStream, RequestOutput]]) -> None:
        if deliveries and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(_deliver, deliveries)


def _common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading ids `a` and `b` have in common (by bisection: list slices compare
    in C, where a Python loop over a long prompt would hold the event loop)."""
    low, high = 0, min(len(a), len(b))
    while low < high:
        middle = (low + high + 1) // 2
        if a[:middle] == b[:middle]:
            low = middle
        else:
            high = middle - 1
    return low


def _scores(
    chosen: torch.Tensor, top_ids: torch.Tensor, top_values: torch.Tensor, asked: list[int | None]
) -> list[_Scores]:
    """Sampler.logprobs' tensors as each row's log-probability and its `asked[row]`
    likeliest (id, log-probability); copied from the device once."""
    rows = zip(chosen.tolist(), top_ids.tolist(), top_values.tolist(), asked, strict=True)
    return [
        (logprob, tuple(zip(ids[: k or 0], values[: k or 0], strict=True)))
        for logprob, ids, values, k in rows
    ]


def _deliver(deliveries: list[tuple[RequestStream, RequestOutput]]) -> None:
    for stream, output in deliveries:
        stream.queue.put_nowait(output)
