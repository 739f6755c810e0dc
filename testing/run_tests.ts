/**
 * `deno task test`: runs `deno test` with the real `@std/assert` and `@std/net`
 * where JSR can be reached (or they are cached), and otherwise with the small
 * stand-ins in testing/std/, saying so in one line on stderr. Either way every
 * test runs. Extra arguments go to `deno test` (e.g. `--filter half-close`).
 * With `--deploy` first (`deno task test:deploy`), it runs the HAProxy check
 * instead, deploy/haproxy_check.ts.
 *
 * @module
 */

const here = new URL(".", import.meta.url);
/** The tests' Unix sockets: Deno grants net access to each by its exact path (testing/helpers.ts). */
const sockets = new URL(".sockets/", here).pathname;
const socketNames = ["server.sock", "other.sock"];

/** What the tests may do: serve and connect on loopback, run deno, read one variable. */
const PERMISSIONS = [
  // 0.0.0.0: @std/net's getAvailablePort() probes the wildcard address; 127.0.0.2 is a
  // second UDP source for the rate cap; unix: the tests' sockets.
  `--allow-net=127.0.0.1,127.0.0.2,0.0.0.0,[::1],${
    socketNames.map((name) => `unix:${sockets}${name}`).join(",")
  }`,
  // The repository: package_test.ts runs README.md's import example, docs_test.ts follows
  // every link of the Markdown files; the tests' sockets live in testing/.sockets/.
  `--allow-read=${new URL("..", here).pathname}`,
  `--allow-write=${sockets}`,
  // The tests start main.ts and client.ts as a user would; sh, to start one
  // under a small `ulimit -n`; script, to give one a terminal.
  "--allow-run=deno,sh,script",
  // Replays the random-chunking test: ECHO_SEED=123 deno task test.
  "--allow-env=ECHO_SEED",
  // Deno.listenDatagram (UDP) is still unstable in Deno 2.
  "--unstable-net",
  // The epoll selector's servers, in the test process too, call the C library.
  "--allow-ffi",
];

async function run(args: string[], quiet = false): Promise<number> {
  const io = quiet ? "null" : "inherit";
  const { code } = await new Deno.Command("deno", { args, stdout: io, stderr: io }).output();
  return code;
}

const probe = new URL("std_probe.ts", here).pathname;
const standIns = new URL("std/import_map.json", here).pathname;

const online = await run(["install", "--quiet", "--entrypoint", probe], true) === 0;
const importMap: string[] = [];
if (!online) {
  console.error(
    "JSR is unreachable: testing with the stand-ins for @std/assert and @std/net in testing/std/",
  );
  importMap.push(`--import-map=${standIns}`);
}
// --deploy: deploy/haproxy_check.ts alone, which needs HAProxy (deno task test:deploy).
const deploy = Deno.args[0] === "--deploy";
const tests = deploy
  ? [
    "--allow-net=127.0.0.1",
    "--allow-run=deno,haproxy",
    new URL("../deploy/haproxy_check.ts", here).pathname,
    ...Deno.args.slice(1),
  ]
  : ["--doc", ...PERMISSIONS, ...Deno.args];
Deno.exit(await run(["test", ...importMap, ...tests]));
