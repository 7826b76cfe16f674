"""SFPrompt: split federated prompt tuning with a local-loss update and pruning.

Cao, Zhu, Gong, "SFPrompt: Communication-Efficient Split Federated
Fine-Tuning for Large Pre-Trained Models over Resource-Limited Devices",
arXiv 2024, https://arxiv.org/abs/2407.17533.

- **Model**: ``f = tail . body . head``, split U-shaped so labels stay on the
  client: head = embeddings + soft prompts + the first ``head-blocks``
  transformer blocks, body = the blocks between (the server's, frozen),
  tail = the last ``tail-blocks`` blocks + the classifier
  (:func:`tasks.foundation.split_blocks`).
- **Client** (routine ``sfprompt``, :mod:`clientapps.recipes.sfprompt`),
  each round: (1) ``local-loss-epochs`` epochs on ``tail(head(x))``, the body
  skipped (no communication); (2) EL2N pruning with that local path, keeping
  the ``keep-fraction`` highest-scored examples; (3) split training of the
  trainable entries on the kept examples through the frozen body.
- **Server**: FedAvg, weighted by the examples trained in (3), of the
  trainable entries (prompts and classifier with ``peft=prompt``).

Wire protocol: FedAvg's on the trainable entries (``arrays`` = prompts +
classifier; the frozen backbone never travels, ``frozen-digest`` checks it,
:mod:`tasks.finetune`); ``config`` carries ``sfprompt.keep-fraction``,
``sfprompt.local-loss-epochs``, ``sfprompt.head-blocks``,
``sfprompt.tail-blocks`` and ``sfprompt.split``; replies add the metrics
``sfprompt.split-uplink-bytes`` (``s`` and ``dL/dh``),
``sfprompt.split-downlink-bytes`` (``h`` and ``dL/ds``) and
``sfprompt.kept-examples``; the round's totals are the train metrics
``sfprompt.split-bytes-total`` and ``sfprompt.kept-examples-total``. No state
beyond the global arrays.

**The split as messages** (``split = "messages"``; ``"simulated"``, the
default, keeps the spec's option A below): the server holds the frozen body
(its copy of the run's model, from the ServerApp: ``use_server_model``) and
the round's train exchange is a sequence of exchanges
(:meth:`exchange_train`, the driver's seam), each one message per node still
training, all through the driver's ``Exchange`` (bytes, error and missing
replies counted there). Messages of type ``train.split``, config = the
round's + ``split-phase``, tensors in the record ``split``:

1. ``begin`` (the arrays and config): the node runs phases 1 and 2 and plans
   its batches; reply ``s`` of the first batch, and ``split-info``
   (``done``, ``wants-grad``: whether anything before the body trains);
2. per step, the server computes ``h = body(s)`` (its forward pass, kept
   until ``dL/dh`` arrives), then ``tail`` (``h``) -> reply ``dL/dh``; the
   server's ``dL/ds`` goes in ``step`` -> reply the next batch's ``s`` or
   ``done``. Where nothing before the body trains, ``step`` carries ``h``
   and no gradient crosses (as in the simulated count);
3. the round's own train message (type ``train``) to the nodes that are
   done: its reply is the trained entries, as in the simulated mode, and is
   what is accepted and aggregated.

A node's reply that does not fit (no ``s``, not float32, not ``(b, T, d)``
as the server's own head gives with ``1 <= b <= batch-size``, not finite; a
bad ``dL/dh``; an error reply; more steps than its settings allow) removes
it from the round, logged as a drop (``drop-reasons``). The node recomputes
its head's forward pass in ``step`` instead of keeping an autograd graph:
in deployment every message is a new process, and the state it keeps
between messages is ``Context.state``
(:mod:`clientapps.recipes.sfprompt`). Each step costs two round trips, so in
deployment it pays Flower's polling latency (the deployment grid pulls
every 3 s) twice per step: this mode is for checking the protocol and the
traffic, the simulated one for experiments. The arrays travel twice down
(``begin`` and the train message, which Flower's contract and acceptance
read) and once up. Refused: a body with trainable entries (``peft`` that
trains inside the body: the server's copy does not train), and compressed
uplinks or downlinks. A simulated client-side attack that acts through
training hooks (label flipping) is not applied in the split's steps.

**Bytes per round** (per selected client, ``n'`` kept examples, ``E`` split
epochs, ``T`` tokens incl. class and prompt tokens, width ``d``, 4-byte
floats): activations ``4 * E * n' * T * d * 4`` bytes (``s``, ``h``,
``dL/dh``, ``dL/ds``; ``dL/ds`` only where the head trains, as prompts do),
plus the trainable entries twice (down and up). For the stand-in (``vit-tiny``
on 8x8 digits: ``T = 1 + 16 + 4 = 21``, ``d = 64``) that is 21.5 kB per
example-epoch against 3.6 kB of prompts + classifier (906 floats): at this scale the
activations dominate, as the spec warns. The counts are measured (hooks on
the body's input and output), not derived.

Decisions where the spec was open (no official code exists; an unofficial
re-implementation with a head/body/tail split, EL2N pruning and a local-loss
update was read to check the phase order only):

- **Split learning is simulated by default** (the spec's option A): the
  ClientApp holds the frozen body too and runs the three phases itself, so
  the math is the split's exactly; the bytes that would cross the network
  are counted and reported. ``split = "messages"`` is the spec's option B,
  through Flower messages (above); tested equal to the simulated split (the
  same trained entries and byte counts, to float tolerance), and each
  node's steps are batched with the other nodes' into one exchange. The two
  agree where the model has no dropout (the split's messages seed the
  global RNG per message).
- Trainable entries: what the shared ``peft`` makes trainable. The paper's
  setting, and the reproduction configs', is ``peft=prompt`` (VPT-shallow
  prompts in the head, plus the classifier; the tail's block stays frozen).
  The algorithm does not fix ``peft`` (``run_settings``), so that it also
  runs on models without a transformer (an MLP or CNN has no block stack:
  the body is empty, everything is the client's, and the split bytes are 0).
- Split points: 1 head block and 1 tail block; on ``vit-tiny`` (4 blocks)
  the body is blocks 2-3.
- The local-loss phase uses the round's local-training settings (optimizer,
  lr, batch size, ``local-steps`` cap) with a fresh optimizer, on all local
  examples, before pruning; the tail sees the head's output directly, with
  no weighting between the two paths (not retrieved).
- EL2N is recomputed every round from the self-updated local path, from the
  first round; ties keep the lower index; at least one example is kept.
- The FedAvg weight is the number of examples of the split phase (after
  pruning), the paper's data-size weighting on the data actually used.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from logging import WARNING
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.supercore import log

from bouquet.strategies.base import Reduction
from bouquet.strategies.context import RoundContext
from bouquet.strategies.driver import client_times
from bouquet.strategies.fedavg import FedAvg
from bouquet.strategies.registry import register
from bouquet.strategies.validation import ClientReply
from bouquet.tasks import wire
from bouquet.tasks.arrays import array_record, array_view
from bouquet.tasks.params import Param

if TYPE_CHECKING:
    from bouquet.strategies.driver import Exchange

NAME = "sfprompt"
UPLINK_BYTES = f"{NAME}.split-uplink-bytes"
DOWNLINK_BYTES = f"{NAME}.split-downlink-bytes"
KEPT = f"{NAME}.kept-examples"
SPLIT_MODES = ("simulated", "messages")
SPLIT_MESSAGE = f"train.{wire.SPLIT_ACTION}"
SPLIT_CLIENT_TIME = f"{NAME}.split-client-time"
"""Train metric (``split = "messages"``): the seconds the nodes' ClientApps
reported for the round's split messages, summed (their compute in the split;
the train messages' own ``client-time`` is the driver's as always)."""


@register
class SFPrompt(FedAvg):
    """SFPrompt (see the module docstring)."""

    name = NAME
    routine = NAME
    paper = "Cao, Zhu, Gong, arXiv 2024, https://arxiv.org/abs/2407.17533"
    tagline = "Split federated prompt tuning: local-loss update, EL2N pruning"
    family = "foundation models"
    params = (
        *FedAvg.params,
        Param(
            "keep-fraction",
            0.5,
            "(0, 1]",
            "gamma: share of local examples kept by EL2N pruning",
            send=True,
        ),
        Param(
            "local-loss-epochs",
            1,
            ">= 0",
            "epochs of the local-loss update (body skipped)",
            send=True,
        ),
        Param(
            "head-blocks",
            1,
            ">= 0",
            "transformer blocks of the client's head",
            send=True,
        ),
        Param(
            "tail-blocks",
            1,
            ">= 0",
            "transformer blocks of the client's tail",
            send=True,
        ),
        Param(
            "split",
            "simulated",
            choices=SPLIT_MODES,
            help="where the body runs: on the node (simulated) or on the "
            "server, through Flower messages each step (messages)",
            send=True,
        ),
    )
    reductions = (Reduction({"keep-fraction": 1.0, "local-loss-epochs": 0}, "fedavg"),)
    reply_metrics = (UPLINK_BYTES, DOWNLINK_BYTES, KEPT)
    reply_metric_ranges: ClassVar[dict] = {
        UPLINK_BYTES: "[0, 1e18]",
        DOWNLINK_BYTES: "[0, 1e18]",
        KEPT: "[1, 1e12]",
    }

    def train_metrics(
        self, replies: Sequence[ClientReply], ctx: RoundContext
    ) -> dict[str, float]:
        """The round's split traffic and kept examples, summed over clients."""
        return {
            f"{NAME}.split-bytes-total": sum(
                r.metrics[UPLINK_BYTES] + r.metrics[DOWNLINK_BYTES] for r in replies
            ),
            f"{NAME}.kept-examples-total": sum(r.metrics[KEPT] for r in replies),
            **(
                {SPLIT_CLIENT_TIME: self.split_client_time}
                if self.split == "messages"
                else {}
            ),
        }

    # -- the split as messages (split = "messages") ---------------------------

    split_client_time = 0.0

    def use_server_model(self, model: Any, input_shape: tuple[int, ...]) -> None:
        """Keep the server's model: with ``split="messages"`` its body runs here."""
        self.server_model = model  # copied when the split first needs it
        self.input_shape = tuple(input_shape)
        self._server_body = None

    def exchange_train(
        self, messages: list[Message], exchange: Exchange, timeout: float
    ) -> list[Message]:
        """The round's train exchange; with ``split="messages"``, the split's.

        Each step is one exchange for all nodes still training (``s`` up;
        ``h`` down and ``dL/dh`` up where the client's head trains; ``dL/ds``
        down, or ``h`` where it does not); the round's own train messages go
        last and their replies are aggregated as FedAvg's.
        """
        body = self._body() if self.split == "messages" and messages else None
        if body is None:
            return super().exchange_train(messages, exchange, timeout)
        by_node = {int(m.metadata.dst_node_id): m for m in messages}
        cap = self._step_cap(messages[0])
        self.split_client_time = 0.0
        outgoing = {
            n: _split_message(m, "begin", arrays=True) for n, m in by_node.items()
        }
        finished: list[int] = []
        steps = 0
        while outgoing:
            smashed: dict[int, tuple[Any, bool]] = {}
            for node, reply in self._ask(exchange, outgoing, timeout).items():
                parsed = self._smashed_of(reply, by_node[node], body.expected)
                if isinstance(parsed, str):
                    self._drop(node, parsed)
                elif parsed is None:
                    finished.append(node)
                else:
                    smashed[node] = parsed
            steps += 1
            if steps > cap and smashed:
                for node in smashed:
                    self._drop(node, f"split steps beyond {cap}")
                break
            outgoing = self._answer_step(exchange, timeout, by_node, smashed, body)
        return exchange.round_trip([by_node[n] for n in sorted(finished)], timeout)

    def _answer_step(
        self,
        exchange: Exchange,
        timeout: float,
        by_node: dict[int, Message],
        smashed: dict[int, tuple[Any, bool]],
        body: _ServerBody,
    ) -> dict[int, Message]:
        """One step's body passes and the step messages that answer them."""
        import torch

        passes = {n: body.forward(s) for n, (s, _) in smashed.items()}
        step: dict[int, Message] = {}
        tail = {}
        for node, (_, wants_grad) in smashed.items():
            h = passes[node][1].detach().numpy()
            if wants_grad:  # dL/dh first: the server owes dL/ds
                tail[node] = _split_message(by_node[node], "tail", {"h": h})
            else:
                step[node] = _split_message(by_node[node], "step", {"h": h})
        for node, reply in self._ask(exchange, tail, timeout).items():
            s_t, h_t = passes[node]
            grad_h = _tensor_of(reply, "grad-h", tuple(h_t.shape))
            if isinstance(grad_h, str):
                self._drop(node, grad_h)
                continue
            (grad_s,) = torch.autograd.grad(h_t, s_t, torch.from_numpy(grad_h))
            step[node] = _split_message(
                by_node[node], "step", {"grad-s": grad_s.numpy()}
            )
        return step

    def _ask(
        self, exchange: Exchange, outgoing: dict[int, Message], timeout: float
    ) -> dict[int, Message]:
        """One round trip; the replies with content, by node (errors counted)."""
        replies = exchange.round_trip(list(outgoing.values()), timeout)
        answered = {}
        for reply in replies:
            node = int(reply.metadata.src_node_id)
            for seconds in client_times([reply]):  # the node's compute
                self.split_client_time += seconds
            if reply.has_error() or not reply.has_content():
                self._drop(node, "error reply in the split")
            elif node in outgoing:
                answered[node] = reply
        return answered

    def _drop(self, node: int, reason: str) -> None:
        """A node leaves the round's split: logged and reported as a drop."""
        text = f"node {node}: {reason}"
        log(WARNING, "Dropped from the split: %s", text)
        if self.train_round is not None:
            self.train_round.outcome.dropped.append(text)

    def _smashed_of(
        self, reply: Message, sent: Message, expected: tuple[int, ...]
    ) -> tuple[Any, bool] | str | None:
        """``(s, wants dL/ds)`` of a reply, None when the node is done, or why not."""
        info = reply.content.get(wire.SPLIT_INFO)
        if not isinstance(info, ConfigRecord) or not isinstance(info.get("done"), bool):
            return f"no '{wire.SPLIT_INFO}' record with 'done'"
        if info["done"]:
            return None
        batch = int(sent.content[wire.CONFIG].get(wire.BATCH_SIZE, 1 << 30))
        s = _tensor_of(reply, "s", None)
        if isinstance(s, str):
            return s
        if s.ndim != len(expected) + 1 or s.shape[1:] != expected:
            return f"s shaped {s.shape}, not (batch, {', '.join(map(str, expected))})"
        if not 1 <= s.shape[0] <= batch:
            return f"s of {s.shape[0]} examples, not 1 to {batch}"
        return s, bool(info.get("wants-grad", False))

    def _step_cap(self, message: Message) -> int:
        """Most split steps a node may ask for in a round (its settings' worth)."""
        config = message.content[wire.CONFIG]
        if (cap := int(config.get(wire.LOCAL_STEPS, 0) or 0)) > 0:
            return cap
        epochs = int(config.get(wire.LOCAL_EPOCHS, 1))
        batch = int(config.get(wire.BATCH_SIZE, 1))
        return max(1, epochs * math.ceil(self.max_num_examples / batch))

    def _body(self) -> _ServerBody | None:
        """The server's half, or None where the model has no body to split."""
        model = getattr(self, "server_model", None)
        if model is None:
            raise RuntimeError(
                "sfprompt.split = 'messages' runs the body on the server: the "
                "ServerApp passes the model (use_server_model); a custom "
                "ServerApp calls strategy.use_server_model(model, input_shape)."
            )
        if self.uplink is not None or self.downlink is not None:
            raise ValueError(
                "sfprompt.split = 'messages' sends several messages per round: "
                "use compressor = 'none' and downlink-compressor = 'none'."
            )
        split = (self.head_blocks, self.tail_blocks)
        cached = getattr(self, "_server_body", None)
        if cached is not None and cached.split == split:
            return cached if cached.blocks else None
        # A copy: the ServerApp evaluates with its own (in eval mode).
        body = _ServerBody(copy.deepcopy(model).train(), self.input_shape, *split)
        if any(p.requires_grad for block in body.blocks for p in block.parameters()):
            raise ValueError(
                "sfprompt.split = 'messages' needs a frozen body (the server's "
                "copy does not train): this peft trains entries inside it; use "
                "peft = 'prompt' or 'head', other head/tail blocks, or "
                "split = 'simulated'."
            )
        self._server_body = body
        return body if body.blocks else None


class _ServerBody:
    """The server's frozen body: ``h = body(s)`` and its backward pass."""

    def __init__(
        self, model: Any, input_shape: tuple[int, ...], head: int, tail: int
    ) -> None:
        import torch

        from bouquet.tasks.foundation import smashed, split_blocks

        self.model, self.input_shape, self.split = model, input_shape, (head, tail)
        self.blocks = split_blocks(model, head, tail)[1]
        self.expected: tuple[int, ...] = ()
        if self.blocks:
            with torch.no_grad():
                probe = torch.zeros((1, *input_shape))
                self.expected = tuple(smashed(model, head, tail, probe).shape[1:])

    def forward(self, s: np.ndarray) -> tuple[Any, Any]:
        """``(s, h)`` as tensors, ``h`` differentiable in ``s``."""
        import torch

        from bouquet.tasks.foundation import body_output

        s_t = torch.from_numpy(s.copy()).requires_grad_(True)
        probe = torch.zeros((len(s), *self.input_shape))
        return s_t, body_output(self.model, *self.split, s_t, probe)


def _split_message(
    train: Message,
    phase: str,
    tensors: dict[str, np.ndarray] | None = None,
    *,
    arrays: bool = False,
) -> Message:
    """A ``train.split`` message to ``train``'s node: its config, the phase."""
    config = ConfigRecord({**train.content[wire.CONFIG], wire.SPLIT_PHASE: phase})
    content = RecordDict({wire.CONFIG: config})
    if arrays:
        content[wire.ARRAYS] = train.content[wire.ARRAYS]
    if tensors:
        content[wire.SPLIT_TENSORS] = array_record(tensors)
    return Message(
        content=content,
        dst_node_id=train.metadata.dst_node_id,
        message_type=SPLIT_MESSAGE,
        group_id=train.metadata.group_id,
    )


def _tensor_of(
    reply: Message, name: str, shape: tuple[int, ...] | None
) -> np.ndarray | str:
    """The float32, finite tensor ``name`` of a split reply, or why not."""
    record = reply.content.get(wire.SPLIT_TENSORS)
    if not isinstance(record, ArrayRecord) or name not in record:
        return f"no '{name}' in its '{wire.SPLIT_TENSORS}' record"
    try:
        value = array_view(record[name])
    except (ValueError, TypeError) as err:
        return f"'{name}' unreadable ({err})"
    if value.dtype != np.float32:
        return f"'{name}' of dtype {value.dtype}, not float32"
    if shape is not None and value.shape != shape:
        return f"'{name}' shaped {value.shape}, not {shape}"
    if not np.isfinite(value).all():
        return f"'{name}' not finite"
    return value
