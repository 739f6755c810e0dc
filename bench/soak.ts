/**
 * `deno task soak`: one million round trips through main.ts, with connections
 * opening and closing all along, printing the server's memory and descriptors
 * as it goes. Both should level off early and stay flat: anything that grows
 * with traffic is a leak.
 *
 * Usage: deno task soak [--round-trips N]
 *
 * @module
 */

import { runLoad } from "./load.ts";
import { parseCommandLine } from "../cli.ts";
import { processUsage } from "../testing/helpers.ts";

const root = new URL("../", import.meta.url).pathname;

async function main(args: string[]): Promise<number> {
  const parsed = parseCommandLine(
    args,
    { "round-trips": { type: "integer", min: 10_000 } },
    {
      name: "soak.ts",
      help:
        "usage: deno task soak [--round-trips N]\n\nA million round trips through main.ts, printing its memory.\n\n  --round-trips N   how many (default 1000000)",
    },
    (flags) => flags["round-trips"] ?? 1_000_000,
  );
  if ("exit" in parsed) return parsed.exit;
  const total = parsed.options;
  const probe = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = probe.addr.port;
  probe.close();
  const server = new Deno.Command("deno", {
    args: ["run", "--allow-net=127.0.0.1", `${root}main.ts`, "--quiet", "--port", `${port}`],
    stdin: "null",
  }).spawn();
  try {
    for (let i = 0; i < 100; i++) {
      try {
        (await Deno.connect({ hostname: "127.0.0.1", port })).close();
        break;
      } catch {
        await new Promise((resolve) => setTimeout(resolve, 50));
      }
    }
    console.log("round trips | server RSS MiB | server fds | round trips/s");
    console.log("--- | --- | --- | ---");
    const samples: number[] = [];
    let done = 0;
    let failed = 0;
    while (done < total) {
      // Each slice: 50 fresh connections for one second, then closed.
      const result = await runLoad({ port, count: 50, size: 64, duration: 1 });
      done += result.roundTrips;
      failed += result.failed;
      await new Promise((resolve) => setTimeout(resolve, 100)); // the server closes its side
      const usage = await processUsage(server.pid);
      samples.push(usage.rssKiB);
      console.log(
        `${done} | ${(usage.rssKiB / 1024).toFixed(1)} | ${usage.fds} | ${
          Math.round(result.perSecond)
        }`,
      );
    }
    // Flat: the last quarter of the run is within 10% of the second quarter.
    const quarter = (q: number) =>
      samples.slice(q * samples.length >> 2, (q + 1) * samples.length >> 2);
    const peak = (list: number[]) => Math.max(...list);
    const growth = peak(quarter(3)) / peak(quarter(1)) - 1;
    console.log(
      `\n${done} round trips, ${failed} failed connections; RSS peak ${
        (growth * 100).toFixed(1)
      }% between the second and the last quarter of the run`,
    );
    return failed || growth > 0.1 ? 1 : 0;
  } finally {
    server.kill("SIGTERM");
    await server.status;
  }
}

Deno.exit(await main(Deno.args));
