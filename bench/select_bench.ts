/**
 * Micro-benchmark of the dispatcher: the cost of one event (a byte arrives,
 * select() reports it, the callback takes it) with few or many idle keys
 * registered. The figure should not grow with the number of idle keys: a
 * completion lists its key, select() never scans the rest.
 *
 * Run: deno bench --allow-net=127.0.0.1 bench/select_bench.ts
 *
 * @module
 */

import { READ, Selector } from "../loop.ts";

async function pairs(count: number): Promise<[Deno.TcpConn, Deno.TcpConn][]> {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const result: [Deno.TcpConn, Deno.TcpConn][] = [];
  for (let i = 0; i < count; i++) {
    const [ours, peer] = await Promise.all([
      listener.accept(),
      Deno.connect({ hostname: "127.0.0.1", port: listener.addr.port }),
    ]);
    ours.setNoDelay(true);
    peer.setNoDelay(true);
    result.push([ours, peer]);
  }
  listener.close();
  return result;
}

for (const idle of [0, 1000]) {
  const conns = await pairs(idle + 1);
  const selector = new Selector();
  for (const [ours] of conns) selector.register(ours, READ, () => {});
  const [, activePeer] = conns[idle];
  const byte = new Uint8Array(1);
  Deno.bench(`one event with ${idle} idle keys registered`, { group: "select" }, async () => {
    await activePeer.write(byte);
    const events = await selector.select();
    if (events.length !== 1) throw new Error(`expected one ready key, got ${events.length}`);
    events[0][0].recv();
  });
  globalThis.addEventListener("unload", () => {
    selector.close();
    for (const [, peer] of conns) peer.close();
  });
}
