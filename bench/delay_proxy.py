"""A TCP proxy on 127.0.0.1 that delays every chunk by a fixed time, each way.

``make bench`` puts it between the relay under test and smtp-sink to give the outbound hop
the round-trip time of a real network (loopback has none), so that what pipelining saves —
round trips — shows in the figures. Standalone (no project imports): run by bench/run.py as
``python bench/delay_proxy.py --listen PORT --to PORT --delay-ms 5``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib

LOCALHOST = "127.0.0.1"
CHUNK = 65536
IDLE_TIMEOUT = 300.0
"""A connection with nothing to carry for this long is closed (bounded, as every await)."""


async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    """Copy ``reader`` to ``writer``; every chunk leaves ``delay`` seconds after it came, in
    order, without holding back the chunks behind it (a link's latency, not its bandwidth)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(maxsize=1024)

    async def receive() -> None:
        while data := await asyncio.wait_for(reader.read(CHUNK), IDLE_TIMEOUT):
            await queue.put((loop.time() + delay, data))
        await queue.put((loop.time() + delay, b""))

    async def send() -> None:
        while True:
            due, data = await queue.get()
            await asyncio.sleep(max(0.0, due - loop.time()))
            if not data:
                break
            writer.write(data)
            await asyncio.wait_for(writer.drain(), IDLE_TIMEOUT)
        with contextlib.suppress(OSError):
            writer.write_eof()

    async with asyncio.TaskGroup() as tasks:
        tasks.create_task(receive(), name="delay-proxy-receive")
        tasks.create_task(send(), name="delay-proxy-send")


async def serve(listen: int, target: int, delay: float) -> None:
    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.wait_for(
                asyncio.open_connection(LOCALHOST, target), 10
            )
        except (OSError, TimeoutError):
            client_w.close()
            return
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(pump(client_r, server_w, delay), name="delay-proxy-up")
                tasks.create_task(pump(server_r, client_w, delay), name="delay-proxy-down")
        except* (OSError, TimeoutError):
            pass  # one side went away: close both
        finally:
            client_w.close()
            server_w.close()

    server = await asyncio.start_server(handle, LOCALHOST, listen, backlog=1024)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", type=int, required=True)
    parser.add_argument("--to", type=int, required=True)
    parser.add_argument("--delay-ms", type=float, default=5.0)
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.listen, args.to, args.delay_ms / 1000))


if __name__ == "__main__":
    main()
