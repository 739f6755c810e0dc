/**
 * The UDP baseline for `deno task bench:transports`: the smallest Deno UDP echo
 * loop, one receive and one send at a time, no limits and no defences. It is
 * here only to be measured against.
 *
 * Usage: deno run --allow-net=127.0.0.1 --unstable-net bench/udp_baseline.ts PORT
 *
 * @module
 */

const socket = Deno.listenDatagram({
  transport: "udp",
  hostname: "127.0.0.1",
  port: Number(Deno.args[0]),
});
const buffer = new Uint8Array(65_536);
console.log(`listening on 127.0.0.1:${(socket.addr as Deno.NetAddr).port}`);
for (;;) {
  const [datagram, from] = await socket.receive(buffer);
  await socket.send(datagram, from).catch(() => {}); // a refused address drops the datagram
}
