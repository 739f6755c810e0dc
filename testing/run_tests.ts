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
/** deno.json's directory: where `deno test` finds the config, its permission sets and the tests. */
const root = new URL("..", here).pathname;

async function run(args: string[], quiet = false): Promise<number> {
  const io = quiet ? "null" : "inherit";
  const { code } = await new Deno.Command("deno", { args, cwd: root, stdout: io, stderr: io })
    .output();
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
// The grants are deno.json's: "test.permissions" for the suite, the "deploy" set for
// deploy/haproxy_check.ts alone, which needs HAProxy (deno task test:deploy).
const deploy = Deno.args[0] === "--deploy";
const tests = deploy
  ? ["-P=deploy", new URL("../deploy/haproxy_check.ts", here).pathname, ...Deno.args.slice(1)]
  : ["-P", "--doc", ...Deno.args];
Deno.exit(await run(["test", ...importMap, ...tests]));
