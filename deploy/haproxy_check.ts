// `deno task test:deploy`: deploy/haproxy.cfg in front of two echo servers on
// loopback, with HAProxy from Debian's packages (.ci/run installs it). The
// health check must see the echo itself: a server that is down, or that
// answers with the wrong bytes, gets no clients; one that comes back gets them
// again.
import { assert, assertEquals } from "@std/assert";
import { deadline, freePort, runScript, ServerProcess } from "../testing/helpers.ts";

/** HAProxy in the foreground with deploy/haproxy.cfg, its addresses from the environment. */
class HAProxy implements AsyncDisposable {
  readonly front = freePort();
  readonly stats = freePort();
  readonly #child: Deno.ChildProcess;
  readonly #output: Promise<Deno.CommandOutput>;

  constructor(servers: number[]) {
    const env = {
      ECHO_FRONT: `127.0.0.1:${this.front}`,
      ECHO_STATS: `127.0.0.1:${this.stats}`,
      ECHO_1: `127.0.0.1:${servers[0]}`,
      ECHO_2: `127.0.0.1:${servers[1]}`,
      ECHO_CHECK_INTERVAL: "200ms",
    };
    const config = new URL("haproxy.cfg", import.meta.url).pathname;
    this.#child = new Deno.Command("haproxy", {
      args: ["-db", "-f", config],
      env,
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    this.#output = this.#child.output();
  }

  /** Each server's state and last check, from the stats page's CSV: `{ echo1: "UP L7OK" }`. */
  async servers(): Promise<Record<string, string>> {
    let csv: string;
    try {
      const response = await fetch(`http://127.0.0.1:${this.stats}/;csv`);
      csv = await response.text();
    } catch {
      return {}; // not listening yet
    }
    const [header, ...rows] = csv.trim().split("\n").map((line) => line.split(","));
    const column = (name: string) => header.indexOf(name === "pxname" ? "# pxname" : name);
    const states: Record<string, string> = {};
    for (const row of rows) {
      if (row[column("pxname")] !== "echo_servers" || row[column("svname")] === "BACKEND") continue;
      states[row[column("svname")]] = `${row[column("status")]} ${row[column("check_status")]}`;
    }
    return states;
  }

  /** Waits until the servers' states match, e.g. `{ echo1: /^DOWN/, echo2: /^UP/ }`. */
  async until(expected: Record<string, RegExp>, what: string): Promise<void> {
    let states: Record<string, string> = {};
    const matches = () =>
      Object.entries(expected).every(([name, pattern]) => pattern.test(states[name] ?? ""));
    const end = performance.now() + 10_000;
    while (!matches()) {
      if (performance.now() > end) throw new Error(`${what}: ${JSON.stringify(states)}`);
      await new Promise((resolve) => setTimeout(resolve, 100));
      states = await this.servers();
    }
  }

  async [Symbol.asyncDispose](): Promise<void> {
    this.#child.kill("SIGTERM");
    await this.#output;
  }
}

/** Twenty clients through HAProxy, each checking its echo. */
async function twentyClients(port: number): Promise<void> {
  const { code, stdout, stderr } = await runScript("client.ts", ["--port", `${port}`]);
  assertEquals([code, stderr], [0, ""], stdout);
  assert(stdout.includes("20/20 echoed"), stdout);
}

Deno.test("HAProxy sends clients only to echo servers whose echo passes its health check", async () => {
  const ports = [freePort(), freePort()];
  let first = await ServerProcess.start(["--port", `${ports[0]}`]);
  await using second = await ServerProcess.start(["--port", `${ports[1]}`]);
  await using proxy = new HAProxy(ports);
  try {
    await proxy.until({ echo1: /^UP/, echo2: /^UP/ }, "both servers up");
    await twentyClients(proxy.front);

    // One server stops: marked down, and every client goes to the other.
    await first.stop("SIGTERM");
    await proxy.until({ echo1: /^DOWN/, echo2: /^UP/ }, "the stopped server down");
    const before = second.count(/ connected$/);
    await twentyClients(proxy.front);
    assert(second.count(/ connected$/) - before >= 20, "the clients did not all reach echo2");

    // Something that accepts but does not echo is no echo server: it stays down.
    using liar = Deno.listen({ hostname: "127.0.0.1", port: ports[0] });
    const lying = (async () => {
      for await (const conn of liar) {
        conn.write(new TextEncoder().encode("no echo here")).catch(() => {}).finally(() =>
          conn.close()
        );
      }
    })().catch(() => {}); // ends when the listener closes
    await proxy.until({ echo1: /^DOWN L7RSP$/ }, "the liar failing the echo check");
    await new Promise((resolve) => setTimeout(resolve, 1000)); // five more checks
    await proxy.until({ echo1: /^DOWN/, echo2: /^UP/ }, "the liar still down");
    liar.close();
    await deadline(lying, "the liar's accept loop");

    // The echo server is back on its port: marked up again.
    first = await ServerProcess.start(["--port", `${ports[0]}`]);
    await proxy.until({ echo1: /^UP/, echo2: /^UP/ }, "the restarted server up");
    await twentyClients(proxy.front);
  } finally {
    await first[Symbol.asyncDispose]();
  }
});
