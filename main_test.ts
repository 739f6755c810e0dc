import { assertEquals } from "@std/assert";
import { serve } from "./main.ts";
import { runClients } from "./client.ts";

Deno.test("twenty concurrent clients each get their exact echo", async () => {
  const server = serve({ port: 0, logLevel: "quiet" });
  const results = await runClients({ port: server.addr.port, count: 20 });
  assertEquals(results.map((r) => r.error), Array(20).fill(undefined));
  await server.close();
});
