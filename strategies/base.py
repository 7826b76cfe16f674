"""The base of every Bouquet strategy: a Flower ``Strategy`` with Bouquet's guarantees.

:class:`BouquetStrategy` implements Flower's message-API contract
(``configure_train`` / ``aggregate_train`` / ``configure_evaluate`` /
``aggregate_evaluate`` / ``summary``) and keeps ``start``'s signature exactly,
so Flower's own ``start`` drives it and Flower's wrappers (differential
privacy) wrap it. What it adds (``docs/architecture.md``):

- **One declaration.** A subclass states its algorithm once, as class
  attributes: ``name``, ``routine`` (the client half), ``params`` (each
  hyperparameter's key, default, range), paper, family, reductions, reply
  records and metrics. The constructor's keyword arguments, run-config
  parsing, range checks, the ``pyproject.toml`` table and the README table
  derive from it.
- **Seeded sampling.** Nodes are drawn by :func:`strategies.sampling.sample_nodes`
  from ``(seed, round, phase)``, after waiting up to ``node_wait_timeout``
  seconds for ``min_available_nodes`` (a lost node never blocks a run).
- **An explicit round context.** ``configure_train`` records what it sampled
  and sent in a :class:`~strategies.context.RoundContext`; aggregation and the
  pieces read it there.
- **Reply acceptance.** Replies are checked against what was sent and what the
  algorithm declares, decoded once, and dropped with a logged reason when bad
  (:mod:`strategies.validation`); a reply from a client that did not run the
  algorithm's routine is refused, and a round where no client ran it fails
  the run. Accepted replies are aggregated in ``partition-id`` order.
- **Composed aggregation.** :meth:`make_aggregator` returns the chain of
  weighting, combine rule and server optimizer (:mod:`strategies.pieces`);
  metrics are aggregated once, here.
- **State as a value.** :attr:`state` holds every piece's state and the
  algorithm's own (plain data); :meth:`export_state` / :meth:`load_state`
  checkpoint and resume it.
- **Personal parameters.** ``personal`` names state-dict entries that never
  leave the nodes (glob patterns, or ``"head"`` for the classifier); replies
  omit them and aggregation leaves them alone.

A subclass changes a round through a few hooks, never by copying the loop:
:meth:`make_aggregator`, :meth:`round_config`, :meth:`recipients` (who is sent
what), :meth:`outgoing_records` (extra records for every node),
:meth:`aggregate` (the whole update, when the chain does not fit),
:meth:`expected_records`, :meth:`record_specs` (records not shaped like
the model), :meth:`train_metrics`, :meth:`evaluate_metrics`,
:meth:`skipped`, :meth:`reply_codec` / :meth:`decoded` (replies that
travel compressed), and :meth:`exchange_train` (several exchanges per round:
split learning).
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from logging import ERROR, INFO, WARNING
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from flwr.supercore import log

from bouquet.strategies.aggregation import to_numpy, to_record
from bouquet.strategies.context import NDArrays, RoundContext
from bouquet.strategies.pieces import Aggregator, ByExamples, ServerSGD, WeightedMean
from bouquet.strategies.safety import snapshot, state_problem
from bouquet.strategies.sampling import sample_nodes, wait_for_node_list
from bouquet.strategies.validation import (
    MAX_NUM_EXAMPLES,
    ClientReply,
    Contract,
    RoutineMissingError,
    Sent,
    accept_all,
    array_spec,
    node_accuracy,
    weighted_metrics,
)
from bouquet.tasks import compression, wire
from bouquet.tasks.params import Param, Range

if TYPE_CHECKING:
    from bouquet.strategies.downlink import Downlink
    from bouquet.strategies.driver import Exchange

Record = ArrayRecord | ConfigRecord | MetricRecord
"""A record that can travel in a message besides ``arrays`` and ``config``."""

NODE_WAIT_TIMEOUT = 300.0
"""Default seconds a round waits for ``min_available_nodes``."""


@dataclass(frozen=True)
class Reduction:
    """A setting under which an algorithm equals another, checked numerically.

    ``settings`` (this algorithm's hyperparameters, by key) make its run equal
    the run of ``equals`` with ``equals_settings``; the conformance test runs
    both and compares the final arrays.
    """

    settings: Mapping[str, Any]
    equals: str
    equals_settings: Mapping[str, Any] = field(default_factory=dict)


_COMMON = (
    ("fraction_train", 1.0),
    ("fraction_evaluate", 1.0),
    ("min_train_nodes", 2),
    ("min_evaluate_nodes", 2),
    ("min_available_nodes", 2),
    ("weighted_by_key", wire.NUM_EXAMPLES),
    ("seed", 0),
    ("node_wait_timeout", NODE_WAIT_TIMEOUT),
    ("personal", ()),
    ("max_num_examples", MAX_NUM_EXAMPLES),
)
"""Keyword arguments every strategy takes (Flower's sampling ones, then ours)."""


class BouquetStrategy(Strategy):
    """Flower strategy with Bouquet's guarantees (see the module docstring).

    Parameters
    ----------
    fraction_train, fraction_evaluate : float
        Share of the connected nodes sampled per round (Flower's meaning).
    min_train_nodes, min_evaluate_nodes, min_available_nodes : int
        Flower's minimums; a round aggregates only with at least
        ``min_train_nodes`` accepted replies.
    weighted_by_key : str
        Metric that weights replies (Flower's name).
    seed : int
        Root of the sampling stream and of the clients' streams (sent as
        ``config["seed"]``).
    node_wait_timeout : float
        Seconds a round waits for ``min_available_nodes`` (0: for ever).
    personal : sequence of str
        State-dict entries that never leave the nodes (glob patterns, or
        ``"head"``).
    **hyperparameters
        The algorithm's own, as declared in :attr:`params`.

    """

    # ------------------------------------------------- the declaration --
    name: ClassVar[str] = ""
    """Registry name and ``pyproject.toml`` table (a module may hold a family:
    import the class as ``bouquet.strategies.<ClassName>``)."""
    routine: ClassVar[str] = wire.PLAIN_ROUTINE
    """The client recipe this algorithm needs (``clientapps/recipes``)."""
    params: ClassVar[tuple[Param, ...]] = ()
    """The algorithm's hyperparameters: keys, defaults, ranges."""
    paper: ClassVar[str] = ""
    """Citation: authors, venue, link."""
    tagline: ClassVar[str] = ""
    """One line for the README's algorithm table."""
    family: ClassVar[str] = "baseline"
    reductions: ClassVar[tuple[Reduction, ...]] = ()
    reply_records: ClassVar[tuple[str, ...]] = ()
    """Extra ArrayRecords a train reply carries, each shaped like the model."""
    reply_arrays: ClassVar[str | None] = None
    """What a train reply's ``arrays`` record is, for the compressed uplink
    (``strategies/uplink.py``): ``"model"`` (the local model ``y``),
    ``"update"`` (``y - x``) or None (something else: no generic uplink).
    None with the ``plain`` routine reads as ``"model"``."""
    reply_metrics: ClassVar[tuple[str, ...]] = ()
    """Metrics a train reply must carry besides ``num-examples``."""
    reply_metric_ranges: ClassVar[Mapping[str, str | tuple[str, ...]]] = {}
    """Valid range of a declared reply metric (``"[0, 1e6]"``, or a tuple of
    ranges whose union is valid), where it has one."""
    schedule: ClassVar[str] = "rounds"
    """How the driver runs it: ``"rounds"`` (synchronous) or ``"events"``."""
    global_model: ClassVar[bool] = True
    """False where the algorithm has no global model (knowledge is exchanged as
    predictions, KnFu): the arrays stay the initial ones and the central
    accuracy is not the algorithm's; nodes' own models are evaluated."""
    broadcasts_global_model: ClassVar[bool] = True
    """False where some train messages carry a node's own arrays (a stale, pruned,
    cluster or customized model) instead of the global model: no compressed
    downlink (``strategies/downlink.py``)."""
    replay_settings: ClassVar[Mapping[str, Any]] = {}
    """Run-config values under which two runs with one seed are identical, where
    the defaults are not (DIFF2's client noise comes from OS entropy unless
    ``diff2.noise-source = "seed"``). The conformance test's replay sets them."""
    model_wrapper: ClassVar[str] = "none"
    """A wrapper of ``tasks.models`` the algorithm puts around the run's model
    (``"gated"``: pFedGate's gating layer); both halves build the same model,
    the clients reading it from ``config["model-wrapper"]``."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        args = [name for name, _ in _COMMON] + [p.arg for p in cls.params]
        if twice := sorted({a for a in args if args.count(a) > 1}):
            raise ValueError(
                f"{cls.__name__}: hyperparameter(s) {twice} declared twice or "
                "named like a common argument."
            )
        # The constructor's signature, for help() and IDEs: the common
        # arguments, then the algorithm's hyperparameters with their defaults.
        parameters = [
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default)
            for name, default in _COMMON
        ] + [
            inspect.Parameter(p.arg, inspect.Parameter.KEYWORD_ONLY, default=p.default)
            for p in cls.params
        ]
        cls.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]

    def __init__(
        self,
        *,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_train_nodes: int = 2,
        min_evaluate_nodes: int = 2,
        min_available_nodes: int = 2,
        weighted_by_key: str = wire.NUM_EXAMPLES,
        seed: int = 0,
        node_wait_timeout: float = NODE_WAIT_TIMEOUT,
        personal: Sequence[str] = (),
        max_num_examples: int = MAX_NUM_EXAMPLES,
        **hyperparameters: Any,
    ) -> None:
        self.fraction_train = float(fraction_train)
        self.fraction_evaluate = float(fraction_evaluate)
        self.min_train_nodes = int(min_train_nodes)
        self.min_evaluate_nodes = int(min_evaluate_nodes)
        self.min_available_nodes = int(min_available_nodes)
        self.weighted_by_key = weighted_by_key
        self.arrayrecord_key = wire.ARRAYS
        self.configrecord_key = wire.CONFIG
        self.seed = int(seed)
        self.node_wait_timeout = float(node_wait_timeout)
        self.personal = tuple(personal)
        self.max_num_examples = int(max_num_examples)
        if self.max_num_examples < 1:
            raise ValueError(f"max_num_examples must be >= 1; got {max_num_examples}.")
        if self.fraction_evaluate == 0.0:
            self.min_evaluate_nodes = 0  # as Flower's FedAvg
        if self.fraction_train == 0.0:
            self.min_train_nodes = 0
        self._set_hyperparameters(hyperparameters)
        self.validate()
        self.aggregator = self.make_aggregator()
        self.state: dict[str, Any] = {"aggregator": self.aggregator.init()}
        self.state.update(self.init_state())
        self.extra_config: dict[str, Any] = {}
        """Config values added to every train message by a wrapper (e.g. the
        client-side DP clipping norm, ``strategies/privacy.py``)."""
        self.uplink: compression.Compressor | None = None
        """The compressor train replies are encoded with, where the run asks
        for one (``strategies/uplink.py``); None: replies are dense."""
        self.downlink: Downlink | None = None
        """Compresses the model in train messages, where the run asks for it
        (``strategies/downlink.py``); None: train messages are dense."""
        self.reply_attack: Callable[[list[ClientReply], RoundContext], None] | None
        self.reply_attack = None
        """A simulated omniscient attack (``strategies/attacks.py``): rewrites
        the attackers' accepted train replies in place, from every accepted
        reply, before aggregation; None: replies are aggregated as sent."""
        self.train_round: RoundContext | None = None
        """What the last ``configure_train`` sampled and sent."""
        self.evaluate_round: RoundContext | None = None

    def _set_hyperparameters(self, values: dict[str, Any]) -> None:
        by_arg = {p.arg: p for p in self.params}
        if unknown := sorted(set(values) - set(by_arg)):
            valid = ", ".join(by_arg) or "none"
            raise TypeError(
                f"{type(self).__name__}() got unexpected keyword argument(s) "
                f"{unknown}; its hyperparameters are: {valid}."
            )
        for param in self.params:
            value = values.get(param.arg, param.default)
            setattr(self, param.arg, param.parse(value, f"{self.name}.{param.key}"))

    @classmethod
    def from_run_config(
        cls, common: Mapping[str, Any], run_config: Mapping[str, Any]
    ) -> BouquetStrategy:
        """Build from shared settings and the run config's ``<name>.<key>`` values."""
        values = {
            p.arg: p.parse(
                run_config.get(f"{cls.name}.{p.key}", p.default), f"{cls.name}.{p.key}"
            )
            for p in cls.params
        }
        return cls(**common, **values)

    def validate(self) -> None:
        """Check constraints between hyperparameters (ranges are checked already)."""

    def hyperparameters(self) -> dict[str, Any]:
        """The algorithm's values, by run-config key."""
        return {p.key: getattr(self, p.arg) for p in self.params}

    def run_settings(self) -> dict[str, Any]:
        """Shared run-config values this algorithm fixes (default: none).

        For an algorithm that *is* a setting of the shared machinery, e.g.
        FedPEFT's ``variant`` picks the shared ``peft`` (which entries of the
        model train). The ServerApp applies them before it builds the model,
        refuses a run config that sets them otherwise, and sends them to the
        ClientApps with the run config (``serverapps/run.py``).
        """
        return {}

    # ------------------------------------------------- algorithm hooks --
    def make_aggregator(self) -> Aggregator:
        """The chain of pieces (default: FedAvg's, bit for bit Flower's)."""
        return Aggregator(ByExamples(), WeightedMean(accumulate="wire"), ServerSGD())

    def init_state(self) -> dict[str, Any]:
        """The algorithm's own state before round 1 (besides the aggregator's)."""
        return {}

    def round_config(self, ctx: RoundContext) -> dict[str, Any]:
        """Config values for this round besides the declared ``send`` params.

        ``ctx.config`` holds the values so far (the caller's, the round, the
        seed, the declared ones); what this returns is added last, so it may
        override shared keys (e.g. a scheduled ``lr``).
        """
        return {}

    def recipients(self, ctx: RoundContext) -> dict[int, dict[str, Record]]:
        """Who gets a train message, each with its own extra records.

        The default samples ``fraction_train`` of ``ctx.nodes`` and sends all
        the same content. Records named here replace or add to a node's
        content (a role in its own ``config``, a stale ``arrays``); the order
        is the order messages are sent.
        """
        return {
            n: self._own_arrays(n)
            for n in self.sample(ctx, self.fraction_train, self.min_train_nodes)
        }

    def node_arrays(self, node: int) -> ArrayRecord | None:
        """The arrays ``node`` trains from and is evaluated on, if not the global.

        Where the server keeps a model per node (FedCAC's customised models,
        FED-PUB's ``theta_bar``) or per cluster (ClusterPFL), the default
        :meth:`recipients` and :meth:`configure_evaluate` send it in place of
        the global model; None (the default): the global model.
        """
        return None

    def _own_arrays(self, node: int) -> dict[str, Record]:
        own = self.node_arrays(node)
        return {} if own is None else {wire.ARRAYS: own}

    def outgoing_records(self, ctx: RoundContext) -> dict[str, Record]:
        """Extra records sent with every train message (e.g. a control variate)."""
        return {}

    def aggregate(self, replies: Sequence[ClientReply], ctx: RoundContext) -> NDArrays:
        """The new global arrays from the accepted replies (default: the chain)."""
        arrays, self.state["aggregator"] = self.aggregator.update(
            replies, self.state["aggregator"], ctx
        )
        return arrays

    def train_metrics(
        self, replies: Sequence[ClientReply], ctx: RoundContext
    ) -> dict[str, float]:
        """Extra aggregated train metrics of the round (e.g. a scheduled rate)."""
        return {}

    def evaluate_metrics(
        self, replies: Sequence[ClientReply], ctx: RoundContext
    ) -> dict[str, float]:
        """Extra aggregated evaluation metrics (and a look at the replies)."""
        return {}

    def expected_records(self, ctx: RoundContext) -> tuple[str, ...]:
        """The extra records this round's train replies carry (``reply_records``)."""
        return self.reply_records

    def record_specs(
        self, ctx: RoundContext, model_spec: Mapping[str, Any]
    ) -> dict[str, Mapping[str, Any]]:
        """Entries (shape, dtype) of each extra record this round's replies carry.

        Default: every record of :meth:`expected_records` shaped like the
        shared model (``model_spec``). A record of another shape (soft labels
        keyed by sample id, KnFu) declares its entries here; acceptance checks
        them as it checks the model (keys in order, shapes, dtypes, finite).
        """
        return {name: model_spec for name in self.expected_records(ctx)}

    def node_reply_specs(self, ctx: RoundContext) -> dict[int, Any]:
        """Per node, the ``arrays`` entries (shape, dtype) its train reply carries.

        Only for nodes sent part of the model (FedPipe sends each node the
        slices of its LoRA rank and the adapters it trains, and they come
        back in those shapes); default: none, every reply is shaped like the
        shared model. Acceptance checks each reply against its node's entry.
        """
        return {}

    def skipped(self, ctx: RoundContext) -> None:
        """The round's update was skipped (too few accepted replies)."""

    def compressed_records(self, ctx: RoundContext) -> tuple[str, ...]:
        """The extra reply records the compressed uplink compresses as well.

        With the run-config ``compressor`` (``strategies/uplink.py``): every
        record of :meth:`record_specs` shaped like the shared model (SCAFFOLD's
        control-variate change ``momentum.dc``). Each is sent as the payload of
        ``C(r)`` (error feedback kept per record) and decoded by
        :meth:`decoded_record`. The config key ``uplink.records`` names them to
        the clients. Override to keep a record dense (one that is not a
        difference, where a sparse ``C(r)`` of its values would mean nothing).
        """
        if self.uplink is None or ctx.phase != "train":
            return ()
        spec = _shared_spec(ctx)
        specs = self.record_specs(ctx, spec)
        return tuple(name for name, entries in specs.items() if entries == spec)

    def decoded_record(self, flat: np.ndarray, ctx: RoundContext) -> NDArrays:
        """A compressed extra record from its decoded flat vector ``C(r)``.

        Every shared entry in order: the float ones from ``C(r)`` (float64),
        the integer ones (not sent) zero, as the record is a difference.
        """
        keys = compression.compressed_keys(ctx.arrays, ctx.personal)
        values = compression.unflatten(flat, ctx.arrays, keys)
        return {
            k: values[k] if k in values else np.zeros_like(v)
            for k, v in ctx.arrays.items()
            if k not in ctx.personal
        }

    def reply_codec(self, ctx: RoundContext) -> compression.Compressor | None:
        """The compressor of this round's train replies (None: dense arrays).

        A compressed reply's ``arrays`` record is the compressor's payload of
        one flat vector over the shared float entries in state-dict order
        (:func:`tasks.compression.compressed_keys`); acceptance checks it
        against the payload's spec, then :meth:`decoded` turns it into arrays.
        """
        return self.uplink

    def decoded(self, flat: np.ndarray, ctx: RoundContext) -> NDArrays:
        """A compressed reply's arrays, from its decoded flat vector.

        Default: the vector is the client's update ``C(y - x)``, so the reply
        reads as the model ``x + C(y - x)`` (float64; integer entries, not
        sent, keep the server's value) and every combine rule applies.
        """
        keys = compression.compressed_keys(ctx.arrays, ctx.personal)
        update = compression.unflatten(flat, ctx.arrays, keys)
        arrays = {k: v for k, v in ctx.arrays.items() if k not in ctx.personal}
        if self.reply_arrays == "update":  # the reply is Delta: integers do not move
            return {
                k: update[k] if k in update else np.zeros_like(v)
                for k, v in arrays.items()
            }
        for key, value in update.items():
            arrays[key] = np.add(ctx.arrays[key], value, dtype=np.float64)
        return arrays

    # ------------------------------------------------------- sampling --
    def connected_nodes(self, grid: Grid, server_round: int, needed: int) -> list[int]:
        """The nodes to sample from this round, after waiting for enough of them.

        Waits up to ``node_wait_timeout`` seconds for ``min_available_nodes``
        (a node that restarts comes back); then goes on with the connected
        nodes if there are at least ``needed`` (the phase's minimum), with a
        warning, and otherwise fails with an error that names the numbers.
        """
        wanted = max(self.min_available_nodes, needed)
        nodes = wait_for_node_list(grid, wanted, self.node_wait_timeout)
        if len(nodes) >= wanted:
            return nodes
        if len(nodes) >= needed:
            log(
                WARNING,
                "Round %s: %d node(s) connected after waiting %.0f s, fewer than "
                "min_available_nodes=%d; going on with them.",
                server_round,
                len(nodes),
                self.node_wait_timeout,
                wanted,
            )
            return nodes
        raise RuntimeError(
            f"Round {server_round}: {len(nodes)} node(s) connected after waiting "
            f"{self.node_wait_timeout:.0f} s; the round needs {needed} "
            f"(min_available_nodes={wanted}). Start more SuperNodes, lower "
            "min-train-nodes / min-evaluate-nodes, or raise node-wait-timeout "
            "(0 waits for ever)."
        )

    def sample(self, ctx: RoundContext, fraction: float, minimum: int) -> list[int]:
        """``max(int(N * fraction), minimum)`` of ``ctx.nodes`` (at most N), seeded."""
        count = min(len(ctx.nodes), max(int(len(ctx.nodes) * fraction), minimum))
        return sample_nodes(ctx.nodes, count, self.seed, ctx.server_round, ctx.phase)

    # ------------------------------------------------- Flower contract --
    def _context(
        self,
        phase: str,
        server_round: int,
        arrays: ArrayRecord,
        config: ConfigRecord,
        nodes: list[int],
    ) -> RoundContext:
        num_rounds = config.get(wire.NUM_ROUNDS)
        ctx = RoundContext(
            server_round=server_round,
            num_rounds=int(num_rounds) if isinstance(num_rounds, int) else None,
            phase=phase,
            nodes=tuple(nodes),
            sampled=(),
            arrays=to_numpy(arrays),
            config={},
            seed=self.seed,
            caller_config=dict(config),
        )
        ctx.personal = tuple(wire.resolve_personal(self.personal, list(ctx.arrays)))
        return ctx

    def config_for(self, ctx: RoundContext, config: ConfigRecord) -> dict[str, Any]:
        """The config values of ``ctx``'s phase.

        The caller's, then the round, the seed, the routine, the declared
        ``send`` params, and last :meth:`round_config`.
        """
        values: dict[str, Any] = {
            **config,
            wire.SERVER_ROUND: ctx.server_round,
            wire.SEED: self.seed,
        }
        if ctx.phase == "train":
            values[wire.ROUTINE] = self.routine
        if self.personal:
            values[wire.PERSONAL] = list(self.personal)
        if self.model_wrapper != "none":
            values[wire.MODEL_WRAPPER] = self.model_wrapper
        for param in self.params:
            if key := param.wire_key(self.name):
                values[key] = getattr(self, param.arg)
        ctx.config = values
        if ctx.phase == "train":
            values.update(self.round_config(ctx))
            values.update(self.extra_config)
            if records := self.compressed_records(ctx):
                values[wire.UPLINK_RECORDS] = ",".join(records)
        return values

    def exchange_train(
        self, messages: list[Message], exchange: Exchange, timeout: float
    ) -> list[Message]:
        """Send the round's train messages; the replies ``aggregate_train`` reads.

        The driver's :class:`~strategies.driver.Rounds` calls it between
        ``configure_train`` and ``aggregate_train``. One round trip here; an
        algorithm with several exchanges per round (SFPrompt's split as
        messages) overrides it, sending every message through ``exchange``
        (bytes, error and missing replies are counted there) and returning
        the replies to ``messages``.
        """
        return exchange.round_trip(messages, timeout)

    def use_server_model(self, model: Any, input_shape: tuple[int, ...]) -> None:
        """The run's model as the server builds it (the ServerApp passes it).

        ``input_shape`` is one example's. Unused by default; an algorithm whose
        server computes with part of the model (split learning's body) keeps
        a copy.
        """

    def dp_problem(self) -> str:
        """Why DP wrappers cannot protect this strategy; "" when they can.

        ``strategies/privacy.py`` clips and noises the combine piece's weighted
        mean of updates, so the piece must be a weighted mean and nothing else
        on the server may read the raw replies' arrays. Subclasses whose
        server does add their reason.
        """
        combine = self.aggregator.combine
        if not isinstance(combine, WeightedMean):
            return (
                f"its aggregation ({type(combine).__name__}) is not a weighted mean "
                "of client updates, so clipping does not bound its change"
            )
        return ""

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample nodes (seeded) and send them the arrays and the round's config."""
        if self.fraction_train == 0.0:
            self.train_round = None
            return []
        nodes = self.connected_nodes(grid, server_round, self.min_train_nodes)
        ctx = self._context("train", server_round, arrays, config, nodes)
        ctx.config = self.config_for(ctx, config)
        plan = self.recipients(ctx)
        ctx.sampled = tuple(plan)
        extras = self.outgoing_records(ctx)
        if clash := sorted(set(extras) & {wire.ARRAYS, wire.CONFIG}):
            raise ValueError(f"Extra records may not replace {clash}.")
        if self.downlink is not None:  # each node's model, compressed
            plan = self.downlink.plan(self, ctx, plan)
        shared = RecordDict(
            {wire.ARRAYS: arrays, wire.CONFIG: ConfigRecord(ctx.config), **extras}
        )
        ctx.messages = [
            _message(shared, node, extra, MessageType.TRAIN, server_round)
            for node, extra in plan.items()
        ]
        self.train_round = ctx
        log(
            INFO,
            "configure_train: Sampled %s nodes (out of %s)",
            len(ctx.sampled),
            len(nodes),
        )
        return ctx.messages

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample nodes (seeded) for federated evaluation."""
        if self.fraction_evaluate == 0.0:
            self.evaluate_round = None
            return []
        nodes = self.connected_nodes(grid, server_round, self.min_evaluate_nodes)
        ctx = self._context("evaluate", server_round, arrays, config, nodes)
        ctx.config = self.config_for(ctx, config)
        ctx.sampled = tuple(
            self.sample(ctx, self.fraction_evaluate, self.min_evaluate_nodes)
        )
        content = RecordDict(
            {wire.ARRAYS: arrays, wire.CONFIG: ConfigRecord(ctx.config)}
        )
        ctx.messages = [
            _message(
                content,
                node,
                self._own_arrays(node),
                MessageType.EVALUATE,
                server_round,
            )
            for node in ctx.sampled
        ]
        self.evaluate_round = ctx
        log(
            INFO,
            "configure_evaluate: Sampled %s nodes (out of %s)",
            len(ctx.sampled),
            len(nodes),
        )
        return ctx.messages

    def contract(self, ctx: RoundContext) -> Contract:
        """What an acceptable reply of ``ctx``'s phase carries."""
        if ctx.phase != "train":
            return Contract(
                weight_key=self.weighted_by_key, max_weight=self.max_num_examples
            )
        spec = _shared_spec(ctx)
        codec = self.reply_codec(ctx)
        records = dict(self.record_specs(ctx, spec))
        for name in self.compressed_records(ctx):
            assert self.uplink is not None
            records[name] = self.uplink.spec(_flat_size(ctx))
        return Contract(
            arrays=spec if codec is None else codec.spec(_flat_size(ctx)),
            records=records,
            metrics=self.reply_metrics,
            routine=None if self.routine == wire.PLAIN_ROUTINE else self.routine,
            weight_key=self.weighted_by_key,
            max_weight=self.max_num_examples,
            metric_ranges={
                k: tuple(Range.parse(r) for r in ((v,) if isinstance(v, str) else v))
                for k, v in self.reply_metric_ranges.items()
            },
            node_arrays=self.node_reply_specs(ctx) if codec is None else {},
        )

    def reply_problem(self, reply: ClientReply, ctx: RoundContext) -> str:
        """What is wrong with an otherwise valid reply's content; "" if nothing.

        For checks the contract cannot express (KnFu's soft labels must be
        distributions, FedD2S's labels must be classes); a reply with a
        problem is dropped with it as the reason.
        """
        return ""

    def accept(
        self, replies: Iterable[Message], ctx: RoundContext
    ) -> list[ClientReply]:
        """The replies fit for aggregation, in deterministic order; logs the rest.

        Raises
        ------
        RoutineMissingError
            If replies came back but none ran the algorithm's client routine:
            the run would otherwise go on without its client half.

        """
        replies = list(replies)
        contract = self.contract(ctx)
        good, reasons, errors = accept_all(
            replies, contract, Sent.of(ctx.messages), ctx.answered
        )
        if ctx.phase == "train" and (codec := self.reply_codec(ctx)) is not None:
            good = self.decode_replies(good, codec, ctx, reasons)
        checked = []
        for reply in good:
            if problem := self.reply_problem(reply, ctx):
                reasons.append(f"node {reply.node}: {problem}")
            else:
                checked.append(reply)
        good = checked
        log(
            INFO,
            "aggregate_%s: Received %s results and %s failures",
            ctx.phase,
            len(good),
            len(replies) - len(good),
        )
        for reason in reasons:
            log(WARNING, "Dropped reply from %s", reason)
        ctx.outcome.accepted += len(good)
        ctx.outcome.dropped.extend(reasons)
        ctx.outcome.errors += errors
        if contract.routine and not good and len(reasons) > errors:
            refused = [r for r in reasons if "did not run the routine" in r]
            if len(refused) == len(reasons) - errors:
                raise RoutineMissingError(
                    f"Round {ctx.server_round}: no client ran {self.name}'s client "
                    f"routine '{contract.routine}'; {refused[0]}"
                )
        return good

    def decode_replies(
        self,
        replies: list[ClientReply],
        codec: compression.Compressor,
        ctx: RoundContext,
        reasons: list[str],
    ) -> list[ClientReply]:
        """Compressed replies decoded once; undecodable ones join ``reasons``."""
        d = _flat_size(ctx)
        decoded = []
        for reply in replies:
            if problem := codec.problem(reply.arrays, d):
                reasons.append(f"node {reply.node}: compressed 'arrays' {problem}")
                continue
            if problem := self._record_problem(reply, ctx):
                reasons.append(f"node {reply.node}: {problem}")
                continue
            reply.arrays = self.decoded(codec.decode(reply.arrays, d), ctx)
            for name in self.compressed_records(ctx):
                assert self.uplink is not None
                flat = self.uplink.decode(reply.records[name], d)
                reply.records[name] = self.decoded_record(flat, ctx)
            decoded.append(reply)
        return decoded

    def _record_problem(self, reply: ClientReply, ctx: RoundContext) -> str | None:
        """Why one of ``reply``'s compressed extra records cannot be decoded."""
        for name in self.compressed_records(ctx):
            assert self.uplink is not None
            if problem := self.uplink.problem(reply.records[name], _flat_size(ctx)):
                return f"compressed '{name}' {problem}"
        return None

    def _round(self, phase: str, server_round: int) -> RoundContext | None:
        ctx = self.train_round if phase == "train" else self.evaluate_round
        if ctx is not None and ctx.server_round != server_round:
            raise RuntimeError(
                f"aggregate_{phase}({server_round}) after configure_{phase}"
                f"({ctx.server_round}): configure each round before aggregating it."
            )
        return ctx

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Accept replies, then aggregate them with the algorithm's rule."""
        ctx = self._round("train", server_round)
        if ctx is None:
            return None, None
        if self.downlink is not None:
            replies = list(replies)
            self.downlink.received(self, ctx, replies)
        good = self.accept(replies, ctx)
        if self.reply_attack is not None:  # a simulation's colluding attackers
            self.reply_attack(good, ctx)
        minimum = max(1, self.min_train_nodes)
        if len(good) < minimum:
            log(
                ERROR,
                "Round %s: %d valid train replies, fewer than min_train_nodes=%d; "
                "the global arrays are left unchanged this round.",
                server_round,
                len(good),
                minimum,
            )
            ctx.outcome.update_skipped = True
            self.skipped(ctx)
            return None, None
        arrays = self.aggregate_safely(good, ctx)
        if arrays is None:
            self.skipped(ctx)
            return None, None
        if self.downlink is not None:  # the part of x_t not sent is kept
            arrays = self.downlink.restore(arrays, ctx)
        metrics = weighted_metrics(good)
        metrics.update(self.train_metrics(good, ctx))
        return to_record(arrays), metrics

    def aggregate_safely(
        self, replies: Sequence[ClientReply], ctx: RoundContext
    ) -> NDArrays | None:
        """:meth:`aggregate`, refused when it would leave the model or state unusable.

        Accepted replies are bounded one by one, but legal values can still
        add up: a global array beyond the replies' bound would make every
        honest reply of the next round look out of range, and non-finite
        state never recovers. Such a round is refused and logged; the
        arrays and the strategy state stay as they were before it.
        """
        saved = snapshot(self.state)
        arrays = self.aggregate(replies, ctx)
        if problem := state_problem(arrays, self.state, saved):
            self.state = saved.value
            log(
                ERROR,
                "Round %s: the update was refused, %s; the global arrays and the "
                "strategy state are left as they were.",
                ctx.server_round,
                problem,
            )
            ctx.outcome.update_skipped = True
            ctx.outcome.refused = problem
            return None
        return arrays

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Accept evaluation replies; their weighted mean and node accuracies."""
        ctx = self._round("evaluate", server_round)
        if ctx is None:
            return None
        good = self.accept(replies, ctx)
        if not good:
            return None
        metrics = weighted_metrics(good)
        metrics.update(node_accuracy(good))
        metrics.update(self.evaluate_metrics(good, ctx))
        return metrics

    def summary(self) -> None:
        """Log the strategy's configuration, as Flower's strategies do."""
        log(INFO, "\t├──> %s (%s)", type(self).__name__, self.name or "custom")
        for key, value in self.hyperparameters().items():
            log(INFO, "\t│\t├── %s: %s", key, value)
        log(INFO, "\t│\t└── client routine: %s", self.routine)
        log(INFO, "\t├──> Sampling:")
        log(
            INFO,
            "\t│\t├──Fraction: train (%.2f) | evaluate ( %.2f)",
            self.fraction_train,
            self.fraction_evaluate,
        )
        log(
            INFO,
            "\t│\t├──Minimum nodes: train (%d) | evaluate (%d)",
            self.min_train_nodes,
            self.min_evaluate_nodes,
        )
        log(INFO, "\t│\t└──Minimum available nodes: %d", self.min_available_nodes)
        log(INFO, "\t└──> Weighted by: '%s', seed %d", self.weighted_by_key, self.seed)

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    ) -> Result:
        """Run the strategy with Bouquet's driver (Flower's ``start`` signature).

        Flower's own ``Strategy.start`` drives this strategy too; Bouquet's
        driver adds prompt reply polling, per-round accounting and, for
        asynchronous algorithms, their event schedule. Checkpoints, resume
        and per-round callbacks are set on a :class:`strategies.driver.Driver`.
        """
        from bouquet.strategies.driver import Driver

        return Driver().run(
            self,
            grid,
            initial_arrays,
            num_rounds=num_rounds,
            timeout=timeout,
            train_config=train_config,
            evaluate_config=evaluate_config,
            evaluate_fn=evaluate_fn,
        )

    # ---------------------------------------------------------- state --
    def export_state(self) -> dict[str, Any]:
        """The strategy's state (not the global arrays) as plain data.

        Values are shared with the strategy, not copied (checkpoints write them
        out at once): read them, do not change them.
        """
        return dict(self.state)

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`export_state` returned (a copy of it is kept)."""
        self.state.update(copy.deepcopy(dict(state)))


def _shared_spec(ctx: RoundContext) -> dict[str, Any]:
    """Entries (shape, dtype) of the shared model: the arrays sent, less personal."""
    return {k: v for k, v in array_spec(ctx.arrays).items() if k not in ctx.personal}


def _flat_size(ctx: RoundContext) -> int:
    """Length of the flat vector a compressed reply encodes."""
    keys = compression.compressed_keys(ctx.arrays, ctx.personal)
    return sum(math.prod(ctx.arrays[k].shape) for k in keys)


def _message(
    shared: RecordDict,
    node: int,
    extra: Mapping[str, Record],
    message_type: str,
    server_round: int,
) -> Message:
    content = shared
    if extra:
        content = RecordDict(dict(shared.items()))
        for name, record in extra.items():
            content[name] = record
    return Message(
        content=content,
        dst_node_id=node,
        message_type=message_type,
        group_id=str(server_round),
    )


__all__ = [
    "BouquetStrategy",
    "Record",
    "Reduction",
]
