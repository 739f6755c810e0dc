/**
 * `deno task coverage`: runs the whole suite with coverage on, the servers and
 * clients the tests start included (DENO_COVERAGE_DIR reaches every Deno
 * process), prints the report, and fails unless each file of GATED meets the
 * thresholds in deno.json (`coverage.thresholds`). Extra
 * arguments go to the test runner (e.g. `--filter udp`).
 *
 * @module
 */

const root = new URL("../", import.meta.url).pathname;
const dir = `${root}coverage/`;
/** The files held to the thresholds, each on its own. */
const GATED = [
  "loop.ts",
  "fairness.ts",
  "epoll.ts",
  "libc.ts",
  "async_loop.ts",
  "server.ts",
  "callbacks.ts",
  "coroutines.ts",
  "main.ts",
  "client.ts",
];

async function deno(args: string[], env: Record<string, string> = {}, quiet = false) {
  const io = quiet ? "piped" : "inherit";
  return await new Deno.Command("deno", { args, cwd: root, env, stdout: io, stderr: io }).output();
}

await Deno.remove(dir, { recursive: true }).catch(() => {}); // nothing stale counts
const tests = await deno(["task", "test", ...Deno.args], { DENO_COVERAGE_DIR: dir });
if (!tests.success) Deno.exit(tests.code);

// The report of every source file; the thresholds apply below, file by file.
await deno(["coverage", dir, "--exclude=(testing|bench)/|_test\\.ts$", "--threshold=0"]);

let failed = 0;
for (const file of GATED) {
  const gate = await deno(
    ["coverage", dir, `--include=/${file.replace(".", "\\.")}$`],
    { NO_COLOR: "1" },
    true,
  );
  if (gate.success) continue;
  failed++;
  const why = new TextDecoder().decode(gate.stderr)
    .replace(/^error: /m, "").replace(/Stack backtrace:[^]*/, "").trim();
  console.error(`coverage: ${file}: ${why}`);
}
console.log(
  failed
    ? `coverage: ${failed} of ${GATED.length} files below the thresholds`
    : `coverage: ${GATED.join(", ")} meet the thresholds in deno.json`,
);
Deno.exit(failed ? 1 : 0);
