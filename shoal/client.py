"""The public Python client: generate text with a model served by a shoal swarm.

Trio-native::

    async with shoal.open_client(bootstrap=["/ip4/.../tcp/4001/p2p/12D3KooW..."]) as swarm:
        async for piece in swarm.generate("ROMEO:", model="shoal-tiny", max_new_tokens=50):
            print(piece, end="", flush=True)

Blocking, for code that does not use trio (a trio loop runs on a background thread)::

    swarm = shoal.connect(bootstrap=[...])
    print(swarm.generate("ROMEO:", max_new_tokens=50))
    swarm.close()

``generate`` takes a prompt string or chat messages (``[{"role": "user", "content": ...}]``,
rendered with the model's chat template). Temperature 0 is greedy: the tokens are exactly
those of single-process generation, also when a server dies mid-generation.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from libp2p.crypto.ed25519 import create_new_key_pair

from shoal.dht.discovery import Discovery, DiscoveryConfig
from shoal.errors import Error
from shoal.pipeline.chain import ChainConfig, RemoteModel, RemoteSwarm, StepTrace
from shoal.pipeline.errors import RequestRejected
from shoal.pipeline.protocol import Sampling
from shoal.pipeline.tokenizer import StreamDecoder, TextTokenizer
from shoal.transport.host import Host, HostConfig, Reachability, open_host
from shoal.transport.swarmkey import read_swarm_key

log = logging.getLogger(__name__)

DEFAULT_MODEL = "shoal-tiny"
Messages = Sequence[dict[str, str]]


@dataclass(frozen=True, kw_only=True)
class ClientConfig:
    """bootstrap: full multiaddrs of nodes of the swarm. swarm / swarm_key: the swarm's
    name and, for a private swarm, its pnet key file. connect_timeout: seconds to reach a
    bootstrap node. chain: timeouts and failover limits (:class:`ChainConfig`)."""

    bootstrap: tuple[str, ...]
    swarm: str = "main"
    swarm_key: Path | None = None
    connect_timeout: float = 10.0
    chain: ChainConfig = field(default_factory=ChainConfig)


class SwarmClient:
    """Generates through a swarm. Get one from :func:`open_client`, or wrap a running
    node's host and discovery (the node's OpenAI API does)."""

    def __init__(self, remote: RemoteSwarm) -> None:
        self.remote = remote
        #: The route and per-hop timings of the last step of the last generation.
        self.last_trace = StepTrace()

    async def model(self, model: str = DEFAULT_MODEL) -> RemoteModel:
        return await self.remote.model(model)

    async def generate_tokens(
        self,
        prompt: Sequence[int],
        *,
        model: str = DEFAULT_MODEL,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop_ids: Sequence[int] | None = None,
    ) -> AsyncGenerator[int, None]:
        """Token ids for ``prompt`` (token ids), streamed. Stops after an end-of-sequence
        token of the model (or one of ``stop_ids``) or ``max_new_tokens``."""
        remote_model = await self.remote.model(model)
        prompt = list(prompt)
        vocab = remote_model.config.vocab_size
        if not prompt:
            raise RequestRejected("the prompt has no tokens", param="prompt")
        if any(not 0 <= t < vocab for t in prompt):
            raise RequestRejected(f"a prompt token is outside [0, {vocab})", param="prompt")
        if max_new_tokens < 1:
            raise RequestRejected("max_new_tokens must be at least 1", param="max_tokens")
        if len(prompt) >= remote_model.context:
            raise RequestRejected(
                f"the prompt has {len(prompt)} tokens; {model}'s context is {remote_model.context}",
                param="prompt",
            )
        stops = set(remote_model.config.eos_token_ids if stop_ids is None else stop_ids)
        sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        # the caches hold the prompt and every new token but the last
        session = self.remote.open_session(
            remote_model, max_length=len(prompt) + max_new_tokens - 1, sampling=sampling
        )
        self.last_trace = session.trace
        try:
            pending = prompt
            for _ in range(max_new_tokens):
                token = await session.step(pending)
                yield token
                if token in stops:
                    return
                pending = [token]
        finally:
            await session.aclose()

    async def generate(
        self,
        prompt: str | Messages,
        *,
        model: str = DEFAULT_MODEL,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> AsyncGenerator[str, None]:
        """Text pieces for ``prompt`` (a string, or chat messages rendered with the
        model's chat template); never splits a UTF-8 character."""
        tokenizer = await self.tokenizer(model)
        ids = tokenizer.encode(prompt if isinstance(prompt, str) else chat_text(tokenizer, prompt))
        stream = StreamDecoder(tokenizer)
        tokens = self.generate_tokens(
            ids,
            model=model,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
        )
        async for token in tokens:
            piece = stream.push(token)
            if piece:
                yield piece

    async def tokenizer(self, model: str = DEFAULT_MODEL) -> TextTokenizer:
        remote_model = await self.remote.model(model)
        if remote_model.tokenizer is None:
            raise RequestRejected(
                f"{model} has no tokenizer.json on its servers; send token ids "
                "(generate_tokens) instead of text"
            )
        return remote_model.tokenizer


def chat_text(tokenizer: TextTokenizer, messages: Messages) -> str:
    """Chat messages as the model's chat template renders them; a model without one gets
    the play-script layout ``ROLE:\\ncontent\\n\\n`` ... ``ASSISTANT:\\n``."""
    if tokenizer.chat_template is not None:
        return tokenizer.render_chat([dict(m) for m in messages])
    turns = (f"{m['role'].upper()}:\n{m['content']}\n\n" for m in messages)
    return "".join(turns) + "ASSISTANT:\n"


@asynccontextmanager
async def open_client(
    bootstrap: Sequence[str],
    *,
    swarm: str = "main",
    swarm_key: Path | str | None = None,
    connect_timeout: float = 10.0,
    chain: ChainConfig | None = None,
) -> AsyncIterator[SwarmClient]:
    """Join the swarm as a client (an ephemeral identity, DHT in client mode) through
    ``bootstrap`` nodes; closes everything on exit."""
    config = ClientConfig(
        bootstrap=tuple(bootstrap),
        swarm=swarm,
        swarm_key=Path(swarm_key) if swarm_key is not None else None,
        connect_timeout=connect_timeout,
        chain=chain or ChainConfig(),
    )
    if not config.bootstrap:
        raise RequestRejected(
            "give at least one bootstrap address: the full multiaddr "
            "(/ip4/.../tcp/PORT/p2p/12D3KooW...) that `shoal id` prints on a node"
        )
    key_pair = create_new_key_pair()
    psk = read_swarm_key(config.swarm_key) if config.swarm_key else None
    host_config = HostConfig(key_pair=key_pair, listen=("/ip4/127.0.0.1/tcp/0",), psk=psk)
    async with open_host(host_config) as host:
        host.reachability = Reachability.PRIVATE  # a client: query the DHT, store nothing
        await _join(host, config)
        discovery = Discovery(host, config.swarm, key_pair, DiscoveryConfig())
        async with trio.open_nursery() as nursery:
            await nursery.start(discovery.run)
            await _wait_for_routing(discovery)
            yield SwarmClient(RemoteSwarm(host, discovery, config.chain))
            nursery.cancel_scope.cancel()


async def _join(host: Host, config: ClientConfig) -> None:
    failures: list[str] = []
    with trio.move_on_after(config.connect_timeout):
        for addr in config.bootstrap:
            try:
                await host.connect(addr)
                return
            except Error as exc:
                failures.append(str(exc))
    raise RequestRejected(
        f"cannot reach any bootstrap node ({'; '.join(failures) or 'timed out'}); "
        "check the address with `shoal id` on that node, and that it is running"
    )


async def _wait_for_routing(discovery: Discovery) -> None:
    """Until the DHT knows a peer to ask (identify runs right after connecting)."""
    with trio.move_on_after(5.0):
        while not discovery.status().get("routing_table"):  # noqa: ASYNC110 - no event to wait on
            await trio.sleep(0.05)


_Ready = tuple[SwarmClient | None, trio.lowlevel.TrioToken | None, BaseException | None]


class BlockingClient:
    """The blocking facade: a trio loop on a daemon thread runs a :class:`SwarmClient`."""

    def __init__(self, bootstrap: Sequence[str], **options: Any) -> None:
        self._ready: queue.Queue[_Ready] = queue.Queue()
        self._stop: trio.Event | None = None
        self._thread = threading.Thread(
            target=trio.run, args=(self._main, tuple(bootstrap), options), daemon=True
        )
        self._thread.start()
        client, token, error = self._ready.get()
        if error is not None:
            raise error
        assert client is not None and token is not None
        self._client, self._token = client, token

    async def _main(self, bootstrap: tuple[str, ...], options: dict[str, Any]) -> None:
        self._stop = trio.Event()
        try:
            async with open_client(bootstrap, **options) as client:
                self._ready.put((client, trio.lowlevel.current_trio_token(), None))
                await self._stop.wait()
        except BaseException as exc:  # reported to the constructor's caller
            if self._ready.empty():
                self._ready.put((None, None, exc))
            else:
                raise

    def stream(self, prompt: str | Messages, **options: Any) -> Iterator[str]:
        """Text pieces as they come."""
        pieces: queue.Queue[tuple[str | None, BaseException | None]] = queue.Queue()

        async def run() -> None:
            try:
                async for piece in self._client.generate(prompt, **options):
                    pieces.put((piece, None))
                pieces.put((None, None))
            except Exception as exc:
                pieces.put((None, exc))

        trio.from_thread.run_sync(_spawn, run, trio_token=self._token)
        while True:
            piece, error = pieces.get()
            if error is not None:
                raise error
            if piece is None:
                return
            yield piece

    def generate(self, prompt: str | Messages, **options: Any) -> str:
        """The whole completion (``generate`` of :class:`SwarmClient`, joined)."""
        return "".join(self.stream(prompt, **options))

    def close(self) -> None:
        if self._stop is not None and self._thread.is_alive():
            trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        self._thread.join(10)

    def __enter__(self) -> BlockingClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _spawn(fn: Any) -> None:
    trio.lowlevel.spawn_system_task(fn)


def connect(
    bootstrap: Sequence[str],
    *,
    swarm: str = "main",
    swarm_key: Path | str | None = None,
    chain: ChainConfig | None = None,
) -> BlockingClient:
    """A blocking client (see :class:`BlockingClient`); ``close()`` it when done."""
    return BlockingClient(bootstrap, swarm=swarm, swarm_key=swarm_key, chain=chain)
