"""The ``shoal`` command line."""

from __future__ import annotations

import json
import logging
import signal
import sys
from pathlib import Path
from typing import Annotated, Any

import httpx
import trio
import typer
from rich.console import Console
from rich.table import Table

from shoal.errors import Error
from shoal.node.config import DEFAULT_API, NodeConfig, board_model, load_config, mem_available
from shoal.node.errors import ConfigError, run_trio
from shoal.node.logs import setup_logging
from shoal.transport.logs import route_libp2p_logs

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
out = Console()
err = Console(stderr=True)


def _fail(message: str, code: int = 1) -> None:
    err.print(f"[bold red]error:[/] {message}", soft_wrap=True, highlight=False)
    raise typer.Exit(code)


@app.command()
def node(
    config_file: Annotated[Path | None, typer.Option("--config", help="TOML config file")] = None,
    bootstrap: Annotated[
        list[str] | None,
        typer.Option("--bootstrap", "-b", help="full multiaddr of a peer (repeatable)"),
    ] = None,
    listen: Annotated[
        list[str] | None, typer.Option(help="multiaddr to listen on (repeatable)")
    ] = None,
    announce: Annotated[
        list[str] | None, typer.Option(help="multiaddr to advertise (repeatable)")
    ] = None,
    data_dir: Annotated[
        Path | None, typer.Option(help="identity and state (default ~/.shoal)")
    ] = None,
    relay: Annotated[
        bool | None,
        typer.Option("--relay/--no-relay", help="serve as a relay for peers behind NAT"),
    ] = None,
    bulk: Annotated[
        bool | None,
        typer.Option(
            "--bulk/--no-bulk",
            help="tensors over a second, sealed TCP port beside libp2p (default on; "
            "--no-bulk where a firewall allows only the libp2p port)",
        ),
    ] = None,
    swarm: Annotated[str | None, typer.Option(help="swarm name (default: main)")] = None,
    swarm_key: Annotated[Path | None, typer.Option(help="pnet key file of a private swarm")] = None,
    api: Annotated[
        str | None, typer.Option(help=f"HTTP API HOST:PORT, or 'off' (default {DEFAULT_API})")
    ] = None,
    offline_after: Annotated[
        float | None, typer.Option(help="seconds of silence before a peer shows offline (30)")
    ] = None,
    dht_refresh: Annotated[
        float | None, typer.Option(help="seconds between DHT re-announcements (30)")
    ] = None,
    log_level: Annotated[str | None, typer.Option(help="debug, info, warning, error")] = None,
    model: Annotated[
        str | None, typer.Option(help="serve this model (Hugging Face directory or built-in name)")
    ] = None,
    model_id: Annotated[
        str | None, typer.Option(help="the model's name in the swarm (default: its name)")
    ] = None,
    blocks: Annotated[
        str | None,
        typer.Option(help="A:B (blocks A..B-1), auto, or auto:N (where coverage is weakest)"),
    ] = None,
    dtype: Annotated[str | None, typer.Option(help="fp32, bf16 or fp16 (default fp32)")] = None,
    quantize: Annotated[
        str | None, typer.Option(help="int8, int4, or none (default: none; int8 on a Raspberry Pi)")
    ] = None,
    max_sessions: Annotated[
        int | None, typer.Option(help="inference sessions held at once (32)")
    ] = None,
    max_cache_tokens: Annotated[
        int | None, typer.Option(help="KV cache positions all sessions may reserve (65536)")
    ] = None,
    session_idle: Annotated[
        float | None, typer.Option(help="seconds before an idle session is dropped (300)")
    ] = None,
    api_key: Annotated[
        str | None, typer.Option(help="bearer token the OpenAI-compatible API requires")
    ] = None,
    step_timeout: Annotated[
        float | None, typer.Option(help="API generations: seconds one token may take (60)")
    ] = None,
    route_timeout: Annotated[
        float | None,
        typer.Option(help="API generations: seconds to wait for missing blocks' servers (20)"),
    ] = None,
    threads: Annotated[
        int | None,
        typer.Option(help="torch compute threads (default: cores minus one, at least 1)"),
    ] = None,
    max_memory: Annotated[
        str | None,
        typer.Option(help="bound on weight memory, e.g. 300MB or 1.5GiB (a window of blocks)"),
    ] = None,
    tp_group: Annotated[
        str | None,
        typer.Option(
            help="serve --blocks as one tensor-parallel group with the nodes of this name"
        ),
    ] = None,
    tp_size: Annotated[
        int | None, typer.Option(help="tensor-parallel group: members to wait for")
    ] = None,
    tp_topology: Annotated[
        str | None, typer.Option(help="tensor-parallel all-reduce: auto, star or ring (auto)")
    ] = None,
    tp_weight: Annotated[
        float | None,
        typer.Option(help="tensor-parallel share weight (default: measured matmul speed)"),
    ] = None,
) -> None:
    """Run a node daemon and join a swarm (with --model: serve a span of a model)."""
    try:
        config = load_config(
            config_file,
            {
                "bootstrap": tuple(bootstrap or ()),
                "listen": tuple(listen or ()),
                "announce": tuple(announce or ()),
                "data_dir": data_dir,
                "relay": relay,
                "bulk": bulk,
                "swarm": swarm,
                "swarm_key": swarm_key,
                "api": api,
                "offline_after": offline_after,
                "dht_refresh": dht_refresh,
                "log_level": log_level,
                "model": model,
                "model_id": model_id,
                "blocks": blocks,
                "dtype": dtype,
                "quantize": quantize,
                "max_sessions": max_sessions,
                "max_cache_tokens": max_cache_tokens,
                "session_idle": session_idle,
                "api_key": api_key,
                "step_timeout": step_timeout,
                "route_timeout": route_timeout,
                "threads": threads,
                "max_memory": max_memory,
                "tp_group": tp_group,
                "tp_size": tp_size,
                "tp_topology": tp_topology,
                "tp_weight": tp_weight,
            },
        )
        peer_id = _peer_id(config.data_dir)
    except Error as exc:
        _fail(str(exc), 2)
        return
    setup_logging(config.log_level, peer_id)
    board = board_model()
    edge = config.with_edge_defaults(board, mem_available())
    if edge != config and config.model is not None:
        err.print(
            f"{board}: serving {edge.quantize} weights"
            + (f" within --max-memory {edge.max_memory} bytes" if edge.max_memory else "")
            + " (pass --quantize none or --max-memory SIZE to change)",
            highlight=False,
        )
        config = edge
    try:
        run_trio(_run_until_signal, config)
    except Error as exc:
        _fail(str(exc))
    except OSError as exc:
        _fail(f"{exc}; is another node using the same port? pick one with --listen")


async def _run_until_signal(config: NodeConfig) -> None:
    from shoal.node.daemon import run_node

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(run_node, config)
            async for signum in signals:
                err.print(f"received {signal.Signals(signum).name}, shutting down")
                nursery.cancel_scope.cancel()
                break


def _peer_id(data_dir: Path) -> str:
    from shoal.transport.identity import load_or_create_identity, peer_id_of

    return str(peer_id_of(load_or_create_identity(data_dir)))


@app.command("id")
def show_id(
    data_dir: Annotated[
        Path | None, typer.Option(help="identity and state (default ~/.shoal)")
    ] = None,
    config_file: Annotated[Path | None, typer.Option("--config", help="TOML config file")] = None,
) -> None:
    """Print this node's peer id and the multiaddrs others bootstrap from."""
    from shoal.node.daemon import RUNTIME_FILE
    from shoal.transport.host import expand_wildcards

    try:
        config = load_config(config_file, {"data_dir": data_dir})
        peer_id = _peer_id(config.data_dir)
    except Error as exc:
        _fail(str(exc), 2)
        return
    runtime = config.data_dir / RUNTIME_FILE
    if runtime.exists():  # a running daemon knows its real ports and relayed addresses
        addrs = json.loads(runtime.read_text()).get("addrs", [])
    else:
        addrs = expand_wildcards([f"{a}/p2p/{peer_id}" for a in config.listen])
        addrs = [a for a in addrs if "/tcp/0/" not in a]
    out.print(f"peer id: {peer_id}")
    if not addrs:
        out.print("no addresses: start `shoal node` to learn them")
    for addr in addrs:
        out.print(addr, soft_wrap=True, highlight=False)


@app.command()
def keygen(
    path: Annotated[Path, typer.Argument(help="where to write the key")] = Path("swarm.key"),
) -> None:
    """Write a new swarm key for a private swarm (pass it to every node with --swarm-key)."""
    from shoal.transport.swarmkey import write_swarm_key

    try:
        write_swarm_key(path)
    except FileExistsError:
        _fail(f"{path} exists; refusing to overwrite a swarm key (delete it first)")
    out.print(f"wrote {path}; start every node of the swarm with --swarm-key {path}")


def _api_url(api: str) -> str:
    """``HOST:PORT`` or a URL -> the API's base URL."""
    return api if api.startswith("http") else f"http://{api}"


def _api_get(api: str, path: str) -> Any:
    url = _api_url(api)
    try:
        response = httpx.get(f"{url}{path}", timeout=5)
        response.raise_for_status()
        return response.json()
    except httpx.HTTPError as exc:
        _fail(f"cannot reach the node's API at {url} ({exc}); is `shoal node` running? pass --api")


@app.command()
def status(
    api: Annotated[str, typer.Option(help="the node's API, HOST:PORT or URL")] = DEFAULT_API,
    as_json: Annotated[bool, typer.Option("--json", help="print the raw JSON")] = False,
) -> None:
    """Show a running node's identity, reachability and peers."""
    data = _api_get(api, "/v1/status")
    if as_json:
        out.print_json(data=data)
        return
    out.print(f"[bold]peer id[/]       {data['peer_id']}")
    out.print(
        f"[bold]swarm[/]         {data['swarm']}{' (private)' if data['private_swarm'] else ''}"
    )
    out.print(f"[bold]reachability[/]  {data['reachability']}")
    out.print(f"[bold]relay service[/] {'on' if data['relay_service'] else 'off'}")
    for addr in data["addrs"]:
        out.print(f"[bold]address[/]       {addr}", soft_wrap=True, highlight=False)
    table = Table(title=f"{len(data['peers'])} connected peer(s)")
    table.add_column("peer id", overflow="fold")
    table.add_column("link")
    table.add_column("address")
    for peer in data["peers"]:
        table.add_row(
            peer["peer_id"], "relayed" if peer["relayed"] else "direct", "\n".join(peer["addrs"])
        )
    out.print(table)


@app.command()
def swarm(
    api: Annotated[str, typer.Option(help="the node's API, HOST:PORT or URL")] = DEFAULT_API,
    as_json: Annotated[bool, typer.Option("--json", help="print the raw JSON")] = False,
) -> None:
    """Show the swarm as the shared state sees it: peers, spans, block coverage."""
    data = _api_get(api, "/v1/swarm")
    if as_json:
        out.print_json(data=data)
        return
    peers = Table(title=f"swarm {data['swarm']}: {len(data['peers'])} peer(s)")
    for column in ("peer id", "state", "reachability", "spans", "device", "version"):
        peers.add_column(column, overflow="fold")
    for peer in data["peers"]:
        spans = ", ".join(f"{m}[{a}:{b}]" for m, (a, b) in peer["spans"].items()) or "-"
        device = peer["device"]
        peers.add_row(
            peer["peer_id"],
            "online" if peer["online"] else "[red]offline[/]",
            peer["reachability"],
            spans,
            f"{device['kind']} {device['memory_bytes'] / 2**30:.1f} GiB",
            peer["version"],
        )
    out.print(peers)
    for model_id, model in data["models"].items():
        counts = model["servers_per_block"]
        missing = [i for i, n in enumerate(counts) if n == 0]
        table = Table(title=f"model {model_id}: {model['num_blocks']} blocks")
        table.add_column("block")
        table.add_column("servers")
        for block, count in enumerate(counts):
            table.add_row(str(block), str(count) if count else "[red]0[/]")
        out.print(table)
        if missing:
            out.print(f"[red]blocks without a server:[/] {missing}")


@app.command()
def ping(
    peer: Annotated[str, typer.Argument(help="peer id of a connected peer")],
    size: Annotated[int, typer.Option("--bytes", help="payload size")] = 1024,
    bulk: Annotated[
        bool, typer.Option("--bulk", help="on the path tensors take (a bulk stream if it can)")
    ] = False,
    api: Annotated[str, typer.Option(help="the node's API, HOST:PORT or URL")] = DEFAULT_API,
) -> None:
    """Send a payload to a peer through a running node and check it comes back intact."""
    url = _api_url(api)
    body = {"peer": peer, "bytes": size, "bulk": bulk}
    try:
        response = httpx.post(f"{url}/v1/ping", json=body, timeout=180)
    except httpx.HTTPError as exc:
        _fail(f"cannot reach the node's API at {url} ({exc}); is `shoal node` running?")
        return
    data = response.json()
    if response.status_code != 200:
        _fail(data["error"]["message"])
    mbps = 2 * data["bytes"] / data["seconds"] / 1e6 if data["seconds"] else 0.0
    verdict = "intact" if data["intact"] else "[red]CORRUPTED[/]"
    out.print(
        f"{data['bytes']} bytes to {peer} over {data.get('via', 'libp2p')}: "
        f"{data['seconds'] * 1e3:.2f} ms, {mbps:.1f} MB/s, {verdict}"
    )


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="the text to continue")],
    local: Annotated[
        bool, typer.Option("--local", help="run the whole model in this process (no network)")
    ] = False,
    bootstrap: Annotated[
        list[str] | None,
        typer.Option("--bootstrap", "-b", help="full multiaddr of a node of the swarm"),
    ] = None,
    swarm: Annotated[str, typer.Option(help="swarm name")] = "main",
    swarm_key: Annotated[Path | None, typer.Option(help="pnet key file of a private swarm")] = None,
    model: Annotated[str, typer.Option(help="model directory or built-in name")] = "shoal-tiny",
    max_tokens: Annotated[int, typer.Option(help="most new tokens to generate")] = 200,
    temperature: Annotated[float, typer.Option(help="0 for greedy")] = 0.8,
    top_k: Annotated[int, typer.Option(help="keep the k most likely tokens (0: all)")] = 0,
    top_p: Annotated[float, typer.Option(help="nucleus sampling threshold")] = 0.95,
    repetition_penalty: Annotated[
        float, typer.Option(help="> 1 discourages repeats (--local only)")
    ] = 1.0,
    seed: Annotated[int | None, typer.Option(help="seed for reproducible sampling")] = None,
    dtype: Annotated[str, typer.Option(help="fp32, bf16 or fp16 (--local)")] = "fp32",
    quantize: Annotated[str | None, typer.Option(help="int8 or int4 weights (--local)")] = None,
    max_memory: Annotated[
        str | None, typer.Option(help="bound on weight memory, e.g. 300MB (--local)")
    ] = None,
    chat: Annotated[
        bool, typer.Option("--chat", help="wrap the prompt in the model's chat template")
    ] = False,
    route_timeout: Annotated[
        float, typer.Option(help="seconds to wait for servers of missing blocks")
    ] = 20.0,
) -> None:
    """Generate text, streaming it as it comes: through a swarm (--bootstrap), or --local."""
    _client_logging()
    if local:
        _generate_local(
            prompt,
            model=model,
            max_tokens=max_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            repetition_penalty=repetition_penalty,
            seed=seed,
            dtype=dtype,
            quantize=quantize,
            max_memory=max_memory,
            chat=chat,
        )
        return
    if not bootstrap:
        _fail(
            "give --bootstrap ADDR (a node of the swarm: the full multiaddr `shoal id` prints "
            "there), or run the model in this process with --local; try `shoal demo` for a "
            "local swarm",
            2,
        )
        return
    if repetition_penalty != 1.0:
        _fail("--repetition-penalty works with --local only", 2)
    from shoal.pipeline.chain import ChainConfig

    try:
        run_trio(
            _generate_swarm,
            list(bootstrap),
            prompt,
            {
                "model": model,
                "max_new_tokens": max_tokens,
                "temperature": temperature,
                "top_k": top_k,
                "top_p": top_p,
                "seed": seed,
            },
            chat,
            {
                "swarm": swarm,
                "swarm_key": swarm_key,
                "chain": ChainConfig(route_timeout=route_timeout),
            },
        )
    except Error as exc:
        _fail(str(exc), 1)


async def _generate_swarm(
    bootstrap: list[str],
    prompt: str,
    options: dict[str, Any],
    chat: bool,
    client_options: dict[str, Any],
) -> None:
    from shoal.client import open_client

    async with open_client(bootstrap, **client_options) as swarm:
        await stream_generation(swarm, prompt, options, chat=chat)


async def stream_generation(
    swarm: Any, prompt: str, options: dict[str, Any], *, chat: bool = False
) -> str:
    """Stream a generation to stdout (the prompt first), then the route and speed to
    stderr; returns the generated text."""
    import time

    text: str | list[dict[str, str]] = [{"role": "user", "content": prompt}] if chat else prompt
    sys.stdout.write("" if chat else prompt)
    sys.stdout.flush()
    pieces: list[str] = []
    started = time.perf_counter()
    first: float | None = None
    async for piece in swarm.generate(text, **options):
        first = first if first is not None else time.perf_counter()
        pieces.append(piece)
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    done = time.perf_counter()
    trace = swarm.last_trace
    route = " -> ".join(f"{h.peer[-8:]} blocks {h.start}:{h.end}" for h in trace.route)
    err.print(f"route: client -> {route}", highlight=False, soft_wrap=True)
    if trace.hop_ms:
        hops = ", ".join(f"{peer[-8:]} {ms:.1f} ms" for peer, ms in trace.hop_ms)
        err.print(f"last token, compute per hop: {hops}", highlight=False)
    if trace.failovers:
        err.print(f"failovers: {trace.failovers}", highlight=False)
    if first is not None:
        err.print(
            f"time to first token {1e3 * (first - started):.0f} ms; "
            f"{len(pieces)} pieces in {done - started:.2f} s",
            highlight=False,
        )
    return "".join(pieces)


def _generate_local(
    prompt: str,
    *,
    model: str,
    max_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    repetition_penalty: float,
    seed: int | None,
    dtype: str,
    quantize: str | None,
    max_memory: str | None,
    chat: bool,
) -> None:
    from shoal.kernels.sampling import SamplingParams
    from shoal.node.config import parse_size
    from shoal.pipeline.generate import GenerationStats
    from shoal.pipeline.generate import generate as generate_tokens
    from shoal.pipeline.loading import load_tokenizer, open_checkpoint
    from shoal.pipeline.tokenizer import StreamDecoder
    from shoal.pipeline.window import WindowedSpan, load_bounded_span

    if dtype not in ("fp32", "bf16", "fp16"):
        _fail(f"unknown dtype {dtype!r}; use fp32, bf16 or fp16", 2)
    try:
        checkpoint = open_checkpoint(model)
        tokenizer = load_tokenizer(checkpoint)
        text = tokenizer.render_chat([{"role": "user", "content": prompt}]) if chat else prompt
        weights = load_bounded_span(
            checkpoint,
            max_memory=None if max_memory is None else parse_size(max_memory),
            dtype=dtype,
            quantize=quantize,
            progress=err.is_terminal,
        )
    except Error as exc:
        _fail(str(exc), 2)
        return
    if isinstance(weights, WindowedSpan):
        window = weights.window
        err.print(
            f"--max-memory {max_memory}: a window of {window.size} of {len(window.indices)} "
            "blocks in memory",
            highlight=False,
        )
    sampling = SamplingParams(
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        seed=seed,
    )
    stats = GenerationStats()
    stream = StreamDecoder(tokenizer)
    sys.stdout.write(prompt if not chat else "")
    tokens = generate_tokens(
        weights,
        tokenizer.encode(text),
        max_new_tokens=max_tokens,
        sampling=sampling,
        stop_ids=tokenizer.eos_ids,
        stats=stats,
    )
    try:
        for token in tokens:
            sys.stdout.write(stream.push(token))
            sys.stdout.flush()
    except Error as exc:
        _fail(str(exc), 2)
    finally:
        if isinstance(weights, WindowedSpan):
            weights.close()
    sys.stdout.write("\n")
    err.print(
        f"{stats.new_tokens} tokens; prompt {stats.prompt_tokens} tokens at "
        f"{stats.prefill_tokens_per_second:.1f} tokens/s, "
        f"decode {stats.decode_tokens_per_second:.1f} tokens/s",
        highlight=False,
    )


@app.command()
def train(
    run: Annotated[str, typer.Option(help="the run's name (every peer of a run uses the same)")],
    data: Annotated[Path, typer.Option(help="training text file (each peer trains on --shard)")],
    bootstrap: Annotated[
        list[str] | None,
        typer.Option("--bootstrap", "-b", help="full multiaddr of a peer of the run (repeatable)"),
    ] = None,
    model: Annotated[str, typer.Option(help="shoal-tiny or a model directory")] = "shoal-tiny",
    inner_steps: Annotated[int, typer.Option(help="H: local AdamW steps per round")] = 50,
    rounds: Annotated[
        int | None, typer.Option(help="stop at this round (default: until Ctrl-C)")
    ] = None,
    shard: Annotated[int, typer.Option(help="this peer's shard of --data (0-based)")] = 0,
    shards: Annotated[int, typer.Option(help="how many shards --data is cut into")] = 1,
    codec: Annotated[str, typer.Option(help="pseudo-gradient codec: fp32, fp16 or int8")] = "fp32",
    local: Annotated[
        bool, typer.Option("--local", help="train alone, without a swarm (for comparison)")
    ] = False,
    batch: Annotated[int, typer.Option(help="sequences per inner step")] = 8,
    seq: Annotated[int, typer.Option(help="tokens per sequence")] = 128,
    lr: Annotated[float, typer.Option(help="inner AdamW learning rate")] = 1e-3,
    warmup: Annotated[int, typer.Option(help="inner steps of linear lr warm-up")] = 0,
    decay: Annotated[
        bool,
        typer.Option(
            "--decay", help="cosine-decay the inner lr to 10 % at the last round (needs --rounds)"
        ),
    ] = False,
    outer_lr: Annotated[float, typer.Option(help="outer Nesterov learning rate")] = 0.7,
    outer_momentum: Annotated[float, typer.Option(help="outer Nesterov momentum")] = 0.9,
    scratch: Annotated[
        bool,
        typer.Option(
            "--scratch",
            help="start from random weights of --model's shape (seeded by --run: the same on "
            "every peer) instead of its trained ones",
        ),
    ] = False,
    min_peers: Annotated[
        int, typer.Option(help="a founder's first round waits for this many peers")
    ] = 1,
    quorum: Annotated[
        int,
        typer.Option(
            help="every round waits for this many peers: a peer cut off from the run waits "
            "instead of training alone (1: it goes on, and resyncs when it meets the run)"
        ),
    ] = 1,
    data_dir: Annotated[
        Path | None, typer.Option(help="identity and checkpoints (default ~/.shoal)")
    ] = None,
    listen: Annotated[
        list[str] | None, typer.Option(help="multiaddr to listen on (default: any free port)")
    ] = None,
    swarm: Annotated[str | None, typer.Option(help="swarm name (default: main)")] = None,
    swarm_key: Annotated[Path | None, typer.Option(help="pnet key file of a private swarm")] = None,
    config_file: Annotated[Path | None, typer.Option("--config", help="TOML config file")] = None,
) -> None:
    """Train a model with DiLoCo: found a run, join one with --bootstrap, or --local.
    Checkpoints every round in the data dir; run the same command again to resume."""
    from shoal.node.train import TrainOptions, check_options, train_local, train_swarm

    if local and bootstrap:
        _fail("--local trains without a swarm; drop --bootstrap (or drop --local to join)", 2)
    options = TrainOptions(
        run=run,
        data=data,
        model=model,
        inner_steps=inner_steps,
        rounds=rounds,
        shard=shard,
        shards=shards,
        codec=codec,
        batch=batch,
        seq=seq,
        inner_lr=lr,
        warmup=warmup,
        decay=decay,
        outer_lr=outer_lr,
        outer_momentum=outer_momentum,
        scratch=scratch,
        min_peers=min_peers,
        quorum=quorum,
    )
    try:
        check_options(options)
        config = load_config(
            config_file,
            {
                "data_dir": data_dir,
                "listen": tuple(listen or ("/ip4/0.0.0.0/tcp/0",)),
                "swarm": swarm,
                "swarm_key": swarm_key,
                "log_level": "warning",
            },
        )
    except Error as exc:
        _fail(str(exc), 2)
        return
    setup_logging(config.log_level)
    route_libp2p_logs(logging.CRITICAL)
    try:
        if local:
            summary = train_local(options, config.data_dir, err)
        else:
            summary = run_trio(train_swarm, options, config, err, tuple(bootstrap or ()))
    except Error as exc:
        _fail(str(exc), 1)
        return
    except KeyboardInterrupt:
        err.print(
            "stopped; the last finished round is checkpointed in "
            f"{config.data_dir / 'train'}: run the same command to resume"
        )
        raise typer.Exit(130) from None
    out.print(
        f"run {summary['run']}: rounds {summary['start_round']} -> {summary['round']}, "
        f"held-out loss {summary['held_out_loss']:.4f} nats/token",
        highlight=False,
    )
    out.print(f"state hash {summary['state_hash']}", highlight=False)
    out.print(f"checkpoint {summary['checkpoint']}", soft_wrap=True, highlight=False)


DEMO_PROMPT = "ROMEO:"


@app.command()
def demo(
    prompt: Annotated[str, typer.Option(help="the text the swarm continues")] = DEMO_PROMPT,
    max_tokens: Annotated[int, typer.Option(help="most new tokens to generate")] = 120,
    temperature: Annotated[float, typer.Option(help="0 for greedy")] = 0.0,
    workdir: Annotated[
        Path | None, typer.Option(help="where the nodes keep their data (default: a temp dir)")
    ] = None,
) -> None:
    """Start a local swarm (a bootstrap node and 3 servers of shoal-tiny, separate
    processes on loopback), generate through it, show the route, and shut it down."""
    from shoal.node.demo import run_demo

    _client_logging()
    try:
        run_demo(prompt, max_tokens=max_tokens, temperature=temperature, workdir=workdir)
    except Error as exc:
        _fail(str(exc), 1)
    except KeyboardInterrupt:
        err.print("interrupted; every node of the demo was stopped")
        raise typer.Exit(130) from None


def _client_logging() -> None:
    """Commands that print generated text: our warnings go to stderr, py-libp2p's
    internal errors (a peer's stream that failed and was retried) stay out of the text."""
    setup_logging("warning")
    route_libp2p_logs(logging.CRITICAL)


def main() -> None:
    try:
        app()
    except ConfigError as exc:
        err.print(f"error: {exc}")
        sys.exit(2)


if __name__ == "__main__":
    main()
