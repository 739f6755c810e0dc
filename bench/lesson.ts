/**
 * `deno task lesson`: the lesson's three steps measured on the same loads, for
 * docs/lesson.md. Each style of main.ts (blocking, callbacks, async) serves:
 *
 * - twenty clients, of which the first connects and says nothing for a second:
 *   how long the other nineteen wait for their echo;
 * - a thousand connections of 5-byte round trips through bench/loadgen (built
 *   with Go): round trips per second, Jain's index, and how many timed out.
 *
 * Usage: deno task lesson [--duration S]
 *
 * @module
 */

import { parseCommandLine } from "../cli.ts";
import { buildNative, runLoadgen } from "./native.ts";
import { mainTs, SpawnedServer } from "./spawn.ts";

const STYLES = ["blocking", "callbacks", "async"] as const;
/** How long the quiet client holds its connection before it leaves. */
const QUIET_MS = 1000;

/** One quiet client, then nineteen that say hello: milliseconds until all nineteen have it back. */
async function heldUpMs(port: number): Promise<number> {
  const quiet = await Deno.connect({ hostname: "127.0.0.1", port });
  await new Promise((resolve) => setTimeout(resolve, 50)); // the server has it
  const leaves = setTimeout(() => quiet.close(), QUIET_MS);
  const began = performance.now();
  await Promise.all(Array.from({ length: 19 }, async () => {
    const conn = await Deno.connect({ hostname: "127.0.0.1", port });
    await conn.write(new TextEncoder().encode("hello"));
    const echo = new Uint8Array(5);
    for (let got = 0; got < 5;) got += (await conn.read(echo.subarray(got))) ?? 5;
    conn.close();
  }));
  const took = performance.now() - began;
  clearTimeout(leaves);
  try {
    quiet.close();
  } catch {
    // it left already
  }
  return took;
}

async function main(args: string[]): Promise<number> {
  const parsed = parseCommandLine(args, { duration: { type: "number", min: 0.5 } }, {
    name: "lesson.ts",
    help: `usage: deno task lesson [--duration S]

The lesson's three steps on the same loads (built with Go: apt install golang-go).

  --duration S   seconds of the thousand-connection load per style (default 3)`,
  }, (flags) => ({ duration: flags.duration ?? 3 }));
  if ("exit" in parsed) return parsed.exit;
  const native = await buildNative();
  if ("missing" in native) {
    console.error(`lesson.ts: ${native.missing}`);
    return 1;
  }
  const { duration } = parsed.options;
  console.log(
    `Deno ${Deno.version.deno}, ${navigator.hardwareConcurrency} cpus; main.ts --style STYLE\n`,
  );
  console.log(
    `| style | 19 clients while one says nothing for ${
      QUIET_MS / 1000
    } s | 1000 connections: round trips/s | Jain's index | timed out |`,
  );
  console.log("| --- | --- | --- | --- | --- |");
  for (const style of STYLES) {
    const server = new SpawnedServer(style, mainTs("--style", style));
    try {
      await server.ready();
      const held = await heldUpMs(server.port);
      const load = { port: server.port, mode: "rr", conns: 1000, size: 5, duration } as const;
      const { summary } = await runLoadgen(native.loadgen, { ...load, timeout: 2 });
      console.log(
        `| ${style} | all served in ${Math.round(held)} ms | ${Math.round(summary.perSecond)} | ${
          summary.jain.toFixed(3)
        } | ${summary.timeouts} of 1000 |`,
      );
    } finally {
      await server.stop();
    }
  }
  return 0;
}

Deno.exit(await main(Deno.args));
