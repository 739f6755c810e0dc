import { assert, assertEquals } from "@std/assert";
import { chart } from "./chart.ts";

Deno.test("chart: one bar per server, scenario and figure, the best of each scenario full length", () => {
  const svg = chart(["a", "b <&>"], [
    {
      scenario: "rr 5 B x1",
      bars: [{ perSecond: 20_000, p99: 0.5, jain: 1 }, { perSecond: 10_000, p99: 1, jain: 0.5 }],
    },
    {
      scenario: "bulk x4",
      bars: [{ perSecond: 100, p99: NaN, jain: 1 }, { perSecond: 300, p99: NaN, jain: 1 }],
    },
  ], "title & more");
  assert(svg.startsWith("<svg ") && svg.trimEnd().endsWith("</svg>"));
  assert(svg.includes(">b &lt;&amp;&gt;</text>") && svg.includes(">title &amp; more</text>"));
  const widths = [...svg.matchAll(/<rect x="\d+" y="\d+" width="(\d+\.\d)" height="10"/g)]
    .map((match) => Number(match[1]));
  // Per panel, per scenario: [a, b]. Each scenario on its own scale; Jain's on 0 to 1; no
  // latency bar in bulk.
  assertEquals(widths, [270, 135, 90, 270, 135, 270, 270, 135, 270, 270]);
  assert(svg.includes(">20k</text>") && svg.includes(">0.50</text>") && svg.includes(">–</text>"));
});
