/**
 * `deno task bench:transports`: the transports of RFC 862 beyond TCP.
 *
 * - UDP: main.ts --udp (its rate cap raised out of the way) against the
 *   smallest Deno UDP echo loop (bench/udp_baseline.ts): 20 senders, each
 *   sending a 64-byte datagram and waiting for it back (sent again after
 *   100 ms without a reply), checking every byte; datagrams echoed per second.
 * - Unix sockets against TCP: main.ts on each, 20 connections of 5-byte round
 *   trips (bench/load.ts).
 *
 * Servers alternate run by run, so that a slow spell of the machine hits both.
 *
 * Usage: deno task bench:transports [--duration S] [--runs N]
 *
 * @module
 */

import { parseCommandLine } from "../cli.ts";

const root = new URL("../", import.meta.url).pathname;
const SENDERS = 20;
const SIZE = 64;
const RESEND_MS = 100;

/** A server process, stopped with `await using`. */
async function start(args: string[], ready: () => Promise<unknown>) {
  const child = new Deno.Command("deno", { args, stdin: "null", stdout: "null" }).spawn();
  for (let i = 0;; i++) {
    try {
      await ready();
      break;
    } catch (error) {
      if (i === 100) throw new Error(`${args.join(" ")} did not start: ${error}`);
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
  }
  return {
    async [Symbol.asyncDispose]() {
      child.kill("SIGKILL");
      await child.status;
    },
  };
}

/** A free port on 127.0.0.1 for both TCP and UDP (probed with TCP). */
function freePort(): number {
  const probe = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  probe.close();
  return probe.addr.port;
}

/** One UDP round trip, to see the server answer. */
async function udpPing(port: number): Promise<void> {
  const socket = Deno.listenDatagram({ transport: "udp", hostname: "127.0.0.1", port: 0 });
  try {
    await socket.send(new Uint8Array([1]), { transport: "udp", hostname: "127.0.0.1", port });
    let timer: ReturnType<typeof setTimeout> | undefined;
    const late = new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new Error("no reply")), 200);
    });
    try {
      await Promise.race([socket.receive(), late]);
    } finally {
      clearTimeout(timer);
    }
  } finally {
    socket.close();
  }
}

/** Closed-loop UDP load: datagrams echoed per second, every byte checked. */
async function udpLoad(port: number, seconds: number): Promise<number> {
  const to: Deno.NetAddr = { transport: "udp", hostname: "127.0.0.1", port };
  const end = performance.now() + seconds * 1000;
  let echoed = 0;
  await Promise.all(Array.from({ length: SENDERS }, async (_, s) => {
    const socket = Deno.listenDatagram({ transport: "udp", hostname: "127.0.0.1", port: 0 });
    const buffer = new Uint8Array(65_536);
    const datagram = new Uint8Array(SIZE);
    let receiving = socket.receive(buffer);
    try {
      for (let seq = 0; performance.now() < end; seq++) {
        datagram.fill(0).set([s, seq & 0xff, (seq >> 8) & 0xff]);
        for (;;) { // until this datagram comes back
          await socket.send(datagram, to);
          let timer: ReturnType<typeof setTimeout> | undefined;
          const late = new Promise<undefined>((resolve) => {
            timer = setTimeout(() => resolve(undefined), RESEND_MS);
          });
          const got = await Promise.race([receiving, late]);
          clearTimeout(timer);
          if (!got) continue; // lost: send it again (the receive stays pending)
          receiving = socket.receive(buffer);
          if (got[0].every((byte, i) => byte === datagram[i]) && got[0].length === SIZE) break;
        }
        echoed++;
      }
    } finally {
      receiving.catch(() => {});
      socket.close();
    }
  }));
  return echoed / seconds;
}

const median = (values: number[]) => values.toSorted((a, b) => a - b)[values.length >> 1];

async function main(args: string[]): Promise<number> {
  const parsed = parseCommandLine(args, {
    duration: { type: "number", min: 0.5 },
    runs: { type: "integer", min: 1, max: 20 },
  }, {
    name: "transports.ts",
    help:
      "usage: deno task bench:transports [--duration S] [--runs N]\n\nUDP against a minimal Deno UDP echo loop, Unix sockets against TCP.\n\n  --duration S   seconds per run and server (default 3)\n  --runs N       runs, medians reported (default 3)",
  }, (flags) => ({ duration: flags.duration ?? 3, runs: flags.runs ?? 3 }));
  if ("exit" in parsed) return parsed.exit;
  const { duration, runs } = parsed.options;
  const deno = ["run", "--allow-net=127.0.0.1", "--unstable-net"];

  // UDP: main.ts against the baseline loop.
  const basePort = freePort();
  const mainPort = freePort();
  await using _base = await start(
    [...deno, `${root}bench/udp_baseline.ts`, `${basePort}`],
    () => udpPing(basePort),
  );
  await using _main = await start(
    [
      ...deno,
      `${root}main.ts`,
      "--quiet",
      "--udp",
      "--udp-rate",
      "1000000000",
      "--port",
      `${mainPort}`,
    ],
    () => udpPing(mainPort),
  );
  const udp: [number[], number[]] = [[], []];
  for (let run = 0; run < runs; run++) {
    const order = run % 2 ? [1, 0] : [0, 1];
    for (const i of order) udp[i].push(await udpLoad(i ? mainPort : basePort, duration));
  }
  const [base, ours] = udp.map(median);
  console.log(`Deno ${Deno.version.deno}; ${duration} s per run, median of ${runs}\n`);
  console.log(`UDP, ${SENDERS} senders, ${SIZE}-byte datagrams, closed loop (datagrams/s):`);
  console.log(`  minimal Deno UDP loop  ${Math.round(base)}`);
  console.log(`  main.ts --udp          ${Math.round(ours)} (${(ours / base).toFixed(2)}x)`);

  // Unix sockets against TCP, main.ts on each. Deno grants a Unix socket by its
  // absolute path, which a task line cannot name, so the load runs in a child
  // process (bench/load.ts) given that path; this one only watches the file.
  const tcpPort = freePort();
  const path = new URL(".echo.sock", import.meta.url).pathname;
  const unixAccess = [`--allow-read=${path}`, `--allow-write=${path}`, `--allow-net=unix:${path}`];
  await using _tcp = await start(
    [...deno, `${root}main.ts`, "--quiet", "--port", `${tcpPort}`],
    async () => (await Deno.connect({ hostname: "127.0.0.1", port: tcpPort })).close(),
  );
  await using _unix = await start(
    ["run", ...unixAccess, `${root}main.ts`, "--quiet", "--unix", path],
    () => Deno.lstat(path),
  );
  const streams: [number[], number[]] = [[], []];
  for (let run = 0; run < runs; run++) {
    const order = run % 2 ? [1, 0] : [0, 1];
    for (const i of order) {
      const where = i ? [...unixAccess, `${root}bench/load.ts`, "--unix", path] : [
        "--allow-net=127.0.0.1",
        `${root}bench/load.ts`,
        "--port",
        `${tcpPort}`,
      ];
      const load = ["--count", "20", "--size", "5", "--duration", `${duration}`];
      const { stdout } = await new Deno.Command("deno", { args: ["run", ...where, ...load] })
        .output();
      const rate = new TextDecoder().decode(stdout).match(/, (\d+)\/s$/m)?.[1];
      if (!rate) {
        throw new Error(`the load run printed no rate: ${new TextDecoder().decode(stdout)}`);
      }
      streams[i].push(Number(rate));
    }
  }
  const [tcp, unix] = streams.map(median);
  console.log(`\nmain.ts, 20 connections, 5-byte round trips (round trips/s):`);
  console.log(`  TCP          ${Math.round(tcp)}`);
  console.log(`  Unix socket  ${Math.round(unix)} (${(unix / tcp).toFixed(2)}x)`);
  return 0;
}

Deno.exit(await main(Deno.args));
