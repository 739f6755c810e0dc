// --workers N: N processes share one port (SO_REUSEPORT); the parent drains,
// restarts and reports them, and none outlives it.
import { assert, assertEquals, assertMatch } from "@std/assert";
import { SAME_SIGNAL_MS } from "./cli.ts";
import {
  concat,
  connect,
  freePort,
  pattern,
  readAll,
  runScript,
  ServerProcess,
  untilListening,
  waitUntil,
  writeAll,
} from "./testing/helpers.ts";

/**
 * What the parent needs: the network, and this Deno, to start its workers with
 * (SO_REUSEPORT's --unstable-net comes from deno.json).
 */
const PARENT = { permissions: ["--allow-net=127.0.0.1", `--allow-run=${Deno.execPath()}`] };

/** Starts `main.ts --workers 2`; returns it and its workers' pids, from its listening line. */
async function startPool(args: string[] = []) {
  const server = await ServerProcess.start(["--port", "0", "--workers", "2", ...args], PARENT);
  const [, first, second] = await server.waitFor(/with 2 workers \(pids (\d+), (\d+)\)/);
  return { server, pids: [Number(first), Number(second)] };
}

Deno.test("--workers 2 --selector epoll share one port through the epoll selector's own SO_REUSEPORT", async () => {
  const permissions = [...PARENT.permissions, "--allow-ffi"];
  await using server = await ServerProcess.start(
    ["--port", "0", "--workers", "2", "--selector", "epoll"],
    { permissions },
  );
  await server.waitFor(/with 2 workers/);
  const client = await runScript("client.ts", ["--port", `${server.port}`, "--count", "100"]);
  assertEquals([client.code, client.stderr], [0, ""]);
  const { code, stdout } = await server.stop("SIGTERM");
  assertEquals(code, 0);
  const served = [...stdout.matchAll(/^worker \d: served (\d+) connections?/gm)].map((m) =>
    Number(m[1])
  );
  assertEquals(served.length, 2, stdout);
  assert(served.every((count) => count > 0), `a worker served nothing: ${stdout}`);
});

/** Whether a process runs (kill -0 through sh: Deno.kill needs broader permissions). */
async function alive(pid: number): Promise<boolean> {
  const { code } = await new Deno.Command("sh", { args: ["-c", `kill -0 ${pid} 2>/dev/null`] })
    .output();
  return code === 0;
}

/** Sends a signal to a process, or with a negative `pid` to its whole process group. */
async function signal(pid: number, name: "KILL" | "INT" | "TERM"): Promise<void> {
  await new Deno.Command("sh", { args: ["-c", `kill -${name} ${pid}`] }).output();
}

/** Waits until none of `pids` runs, for at most `ms`. */
async function untilGone(pids: number[], what: string, ms = 10_000): Promise<void> {
  const end = performance.now() + ms;
  for (let left = pids; left.length > 0;) {
    if (performance.now() > end) throw new Error(`${what}: pids ${left} still run after ${ms} ms`);
    left = (await Promise.all(left.map(async (pid) => await alive(pid) ? [pid] : []))).flat();
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

Deno.test("--workers 2 share one port; SIGTERM drains both, bytes read but not yet echoed included; summary per worker and in total", async () => {
  const { server, pids } = await startPool();
  await using _ = server;
  // Ctrl-C at a terminal reaches every process of its group: workers leave it to the parent.
  await signal(pids[0], "INT");
  const client = await runScript("client.ts", ["--port", `${server.port}`, "--count", "100"]);
  assertEquals([client.code, client.stderr], [0, ""]);
  // A connection with bytes in flight when the signal comes: every byte the worker has
  // read comes back, then EOF. (What it had not read yet, it never echoes.)
  const conn = await connect(server.port);
  const peer = `127.0.0.1:${(conn.localAddr as Deno.NetAddr).port}`;
  const sent = pattern(1 << 20, 7);
  const writing = writeAll(conn, sent).then(() => conn.closeWrite());
  const head = await readAll(conn, 1 << 16); // the worker is echoing
  const stopped = server.stop("SIGTERM");
  const rest = await readAll(conn); // to EOF
  await writing;
  conn.close();
  const received = concat([head, rest]);
  const { code, stdout } = await stopped;
  assertEquals(code, 0);
  const echoed = Number(stdout.match(new RegExp(`${peer} closed, (\\d+) bytes echoed$`, "m"))?.[1]);
  assert(echoed > 0, `no echo logged for ${peer}: ${stdout}`);
  assertEquals(received, sent.subarray(0, echoed), "the echo of every byte the worker read");
  const served = [...stdout.matchAll(/^worker (\d): served (\d+) connections?/gm)]
    .map(([, id, count]) => [Number(id), Number(count)]).sort();
  assertEquals(served.map(([id]) => id), [1, 2], stdout);
  assert(served.every(([, count]) => count > 0), `a worker served nothing: ${stdout}`);
  assertEquals(served[0][1] + served[1][1], 101);
  assertMatch(
    stdout,
    /^served 101 connections with 2 workers in \d+\.\d s: \d+ bytes echoed; 0 connections ended in an error$/m,
  );
  await untilGone(pids, "the workers after a drain");
});

Deno.test("a killed worker is restarted and serves; the exit code says one died", async () => {
  const { server, pids } = await startPool();
  await using _ = server;
  await signal(pids[0], "KILL");
  const [, again] = await server.waitFor(/^worker 1 serves again, pid (\d+)$/m);
  assertMatch(
    server.stderr,
    new RegExp(
      `^worker 1 \\(pid ${pids[0]}\\) died: killed by SIGKILL; restarting in 0\\.1 s$`,
      "m",
    ),
  );
  // Dying again soon after its start doubles the pause: no tight restart loop.
  await signal(Number(again), "KILL");
  await waitUntil(
    () =>
      new RegExp(`^worker 1 \\(pid ${again}\\) died: .*; restarting in 0\\.2 s$`, "m").test(
        server.stderr,
      ),
    "the second restart, after a longer pause",
  );
  await server.waitFor(new RegExp(`^worker 1 serves again, pid (?!${again}$)\\d+$`, "m"));
  const client = await runScript("client.ts", ["--port", `${server.port}`, "--count", "50"]);
  assertEquals([client.code, client.stderr], [0, ""]);
  const { code, stdout } = await server.stop("SIGTERM");
  assertEquals(code, 1);
  assertMatch(stdout, /ended in an error; 2 workers crashed and restarted$/m);
});

Deno.test("a worker stopped by SIGTERM from outside is logged as that and restarted; the pool still exits 0", async () => {
  const { server, pids } = await startPool();
  await using _ = server;
  await signal(pids[1], "TERM");
  await server.waitFor(/^worker 2 serves again, pid \d+$/m);
  assertMatch(
    server.stdout,
    new RegExp(
      `^worker 2 \\(pid ${
        pids[1]
      }\\) was stopped by SIGTERM from outside the pool; restarting in 0\\.1 s$`,
      "m",
    ),
  );
  const client = await runScript("client.ts", ["--port", `${server.port}`, "--count", "20"]);
  assertEquals([client.code, client.stderr], [0, ""]);
  const { code, stdout, stderr } = await server.stop("SIGTERM");
  assertEquals([code, stderr], [0, ""]);
  assertMatch(stdout, /error; 1 worker stopped from outside and restarted$/m);
});

Deno.test("the workers run the Deno that runs the pool, not the deno first on PATH", async () => {
  // testing/path_deno/deno refuses to start a worker, and runs anything else as Deno.
  const pathDeno = new URL("./testing/path_deno", import.meta.url).pathname;
  await using server = await ServerProcess.start(["--port", "0", "--workers", "2"], {
    ...PARENT,
    shell: `PATH=${pathDeno}:$PATH`,
    env: { REAL_DENO: Deno.execPath() },
  });
  const { code, stderr } = await server.stop("SIGTERM");
  assertEquals([code, stderr], [0, ""]);
});

Deno.test("Ctrl-C to the process group of deno task start:workers: one clean shutdown, summary and exit 0", async () => {
  // A terminal's Ctrl-C signals every process of its foreground group; deno task
  // forwards the signal to its child too, so the pool's parent gets SIGINT twice.
  for (let run = 1; run <= 2; run++) {
    await using task = await ServerProcess.start(["--workers", "2", "--port", "0"], {
      task: "start:workers",
      newSession: true,
    });
    try {
      const [, first, second] = await task.waitFor(/with 2 workers \(pids (\d+), (\d+)\)/);
      await signal(-task.pid, "INT");
      const { code, stdout } = await task.stop();
      assertEquals(code, 0, `run ${run}: ${stdout}\n${task.stderr}`);
      assertMatch(stdout, /^served 0 connections with 2 workers in /m, `run ${run}`);
      await untilGone([Number(first), Number(second)], "the workers after Ctrl-C");
    } finally {
      await signal(-task.pid, "KILL"); // whatever is left of the group, if the test failed
    }
  }
});

Deno.test("no orphans: a parent killed with SIGKILL takes its workers with it; a second signal too", async () => {
  const killed = await startPool();
  await killed.server.stop("SIGKILL");
  await untilGone(killed.pids, "the workers of a parent killed with SIGKILL");

  // A peer that never half-closes keeps the drain waiting; a second SIGTERM ends it at once.
  const { server, pids } = await startPool();
  await using _ = server;
  const conn = await connect(server.port);
  await writeAll(conn, pattern(10));
  await readAll(conn, 10);
  server.stop("SIGTERM"); // the first: drain
  await server.waitFor(/^shutting down 2 workers/m);
  await new Promise((resolve) => setTimeout(resolve, SAME_SIGNAL_MS)); // then a second request
  const { code } = await server.stop("SIGTERM");
  assertEquals(code, 143);
  // At once: not after the 5 s grace period the drain would give the connection.
  await untilGone(pids, "the workers after a second SIGTERM", 2000);
  conn.close();
});

Deno.test("a pool that cannot start says why in one line: a port in use, no --allow-run", async () => {
  using held = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = held.addr.port;
  const busy = await runScript("main.ts", ["--workers", "2", "--port", `${port}`], PARENT);
  assertEquals([busy.code, busy.stdout], [1, ""]);
  assertEquals(
    busy.stderr,
    `main.ts: port ${port} on 127.0.0.1 is already in use: stop the other server or choose another port with --port\n`,
  );
  const denied = await runScript("main.ts", ["--workers", "2"]);
  assertEquals([denied.code, denied.stdout], [1, ""]);
  assertEquals(
    denied.stderr,
    `main.ts: --workers starts its workers with this Deno: add --allow-run=${Deno.execPath()} (deno task start:workers does)\n`,
  );
  const noUnstable = await runScript("main.ts", ["--worker", "1", "--port", "0"], {
    noConfig: true,
  });
  assertEquals(
    [noUnstable.code, noUnstable.stderr],
    [2, "main.ts: --worker shares its port (SO_REUSEPORT): add --unstable-net\n"],
  );
});

Deno.test("--workers with --quiet prints nothing; with --log-format json, one object per line, tagged", async () => {
  const quiet = await startPoolQuietly();
  await using _quiet = quiet.server;
  const client = await runScript("client.ts", ["--port", `${quiet.port}`, "--count", "10"]);
  assertEquals(client.code, 0);
  assertEquals(await quiet.server.stop("SIGTERM"), { code: 0, stdout: "", stderr: "" });

  const { server } = await startPool(["--log-format", "json"]);
  await using _ = server;
  const echoed = await runScript("client.ts", ["--port", `${server.port}`, "--count", "10"]);
  assertEquals(echoed.code, 0);
  const { code, stdout } = await server.stop("SIGTERM");
  assertEquals(code, 0);
  const lines = stdout.trimEnd().split("\n").map((line) => JSON.parse(line));
  assertMatch(lines[0].message, /^listening on 127\.0\.0\.1:\d+ with 2 workers/);
  const tagged = lines.filter((line) => / connected$/.test(line.message));
  assertEquals(tagged.length, 10);
  assert(tagged.every((line) => line.worker === 1 || line.worker === 2), stdout);
  assertMatch(lines.at(-1).message, /^served 10 connections with 2 workers/);
});

/** `--workers 2 --quiet` on a free port: it prints nothing, so wait until it answers. */
async function startPoolQuietly() {
  const port = freePort();
  const args = ["--port", `${port}`, "--workers", "2", "--quiet"];
  const server = ServerProcess.spawn(args, PARENT);
  try {
    await untilListening(port);
  } catch (error) {
    await server[Symbol.asyncDispose]();
    throw error;
  }
  return { server, port };
}

Deno.test("a signal while the workers start: those started drain, nothing is left holding the port", async () => {
  // From its first child on, the parent has its signal handlers (it installs them first);
  // before that a signal would meet Deno still loading main.ts, which no program can handle.
  for (const after of [0, 300]) {
    const port = freePort();
    await using pool = ServerProcess.spawn(["--port", `${port}`, "--workers", "2"], PARENT);
    await untilChild(pool.pid);
    await new Promise((resolve) => setTimeout(resolve, after));
    const { code, stderr } = await pool.stop("SIGTERM");
    assertEquals([code, stderr], [0, ""], `SIGTERM ${after} ms after the first worker's start`);
    // No worker holds the port any more: a listener without SO_REUSEPORT gets it.
    await untilFree(port);
  }
});

/** Waits until process `pid` has a child (read from /proc through sh); fails after 10 s. */
async function untilChild(pid: number): Promise<void> {
  const poll = `for i in $(seq 2000); do
    [ -n "$(cat /proc/${pid}/task/*/children 2>/dev/null)" ] && exit 0; sleep 0.005; done; exit 1`;
  const { code } = await new Deno.Command("sh", { args: ["-c", poll] }).output();
  if (code !== 0) throw new Error(`process ${pid} started no child within 10 s`);
}

/** Waits until `port` can be listened on again; fails after 5 s. */
async function untilFree(port: number): Promise<void> {
  for (const end = performance.now() + 5000;;) {
    try {
      Deno.listen({ hostname: "127.0.0.1", port }).close();
      return;
    } catch (error) {
      if (performance.now() > end) throw new Error(`port ${port} still held: ${error}`);
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
  }
}
