/**
 * The performance story as one picture: for each scenario of `deno task
 * bench`, each server's rate, p99 latency and fairness (Jain's index), as
 * grouped horizontal bars, each scenario on its own scale (Jain's on 0 to 1).
 * Hand-written SVG, no dependency.
 *
 * @module
 */

/** One server's figures in one scenario. */
export interface Bar {
  /** Operations per second: round trips, connections, or bytes (bulk). */
  perSecond: number;
  /** 99th percentile latency in milliseconds; NaN where there is none (bulk). */
  p99: number;
  /** Jain's fairness index over the connections: 1 when all were served alike. */
  jain: number;
}

/** The figures of one scenario, one bar per server (in the order of `servers`). */
export interface Row {
  /** The scenario, e.g. "rr 5 B x20". */
  scenario: string;
  /** One per server. */
  bars: Bar[];
}

/** Baseline grey, blue and orange (the deno selector), green and purple (epoll), then the peers. */
const COLORS = [
  "#9aa0a6",
  "#1a73e8",
  "#e8710a",
  "#188038",
  "#9334e6",
  "#b06000",
  "#12b5cb",
  "#3c4043",
];
const LABEL_WIDTH = 120;
const PANEL_WIDTH = 330;
const GAP = 40;
const BAR_HEIGHT = 12;
const ROW_GAP = 14;
const TOP = 56;

/**
 * Draws the chart.
 *
 * @param servers The servers' names, for the legend.
 * @param rows One row per scenario.
 * @param title A line above the chart (machine, Deno version, runs).
 * @returns The SVG document.
 */
export function chart(servers: string[], rows: Row[], title: string): string {
  const rowHeight = servers.length * BAR_HEIGHT + ROW_GAP;
  const height = TOP + rows.length * rowHeight + 30;
  const panels = [
    { title: "per second (more is better)", value: (bar: Bar) => bar.perSecond, max: 0 },
    { title: "p99 latency in ms (less is better)", value: (bar: Bar) => bar.p99, max: 0 },
    { title: "Jain's fairness index (1 is fair)", value: (bar: Bar) => bar.jain, max: 1 },
  ];
  const width = LABEL_WIDTH + panels.length * (PANEL_WIDTH + GAP) - GAP + 20;
  const parts: string[] = [];
  const text = (x: number, y: number, content: string, attrs = "") =>
    parts.push(`<text x="${x}" y="${y}" ${attrs}>${escape(content)}</text>`);

  text(10, 18, title, 'font-size="13" font-weight="bold"');
  text(width - 10, 37, "bars scaled per scenario", 'text-anchor="end" fill="#5f6368"');
  servers.forEach((name, i) => {
    const x = 10 + i * 140;
    parts.push(
      `<rect x="${x}" y="28" width="10" height="10" fill="${COLORS[i % COLORS.length]}"/>`,
    );
    text(x + 14, 37, name);
  });
  panels.forEach((panel, p) => {
    const left = LABEL_WIDTH + p * (PANEL_WIDTH + GAP);
    text(left, TOP - 4, panel.title, 'font-weight="bold"');
    rows.forEach((row, r) => {
      const top = TOP + r * rowHeight;
      // Each scenario has its own scale: they differ a thousandfold, the servers within one do not.
      const values = row.bars.map(panel.value).filter((value) => !Number.isNaN(value));
      const max = panel.max || Math.max(...values, 1e-9);
      if (p === 0) text(10, top + rowHeight / 2, row.scenario);
      row.bars.forEach((bar, b) => {
        const value = panel.value(bar);
        const y = top + b * BAR_HEIGHT;
        if (Number.isNaN(value)) return void text(left, y + BAR_HEIGHT - 3, "–", 'font-size="10"');
        const length = Math.max(1, (value / max) * (PANEL_WIDTH - 60));
        parts.push(
          `<rect x="${left}" y="${y}" width="${length.toFixed(1)}" height="${
            BAR_HEIGHT - 2
          }" fill="${COLORS[b % COLORS.length]}"/>`,
        );
        text(left + length + 4, y + BAR_HEIGHT - 3, format(value), 'font-size="10"');
      });
    });
  });
  text(
    10,
    height - 10,
    "rr SIZE xN: N connections, each sending a SIZE message and waiting for its whole echo; " +
      "bulk: bytes per second streamed; churn: connections per second, one round trip each",
    'fill="#5f6368"',
  );
  return [
    `<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${height}" ` +
    `viewBox="0 0 ${width} ${height}" font-family="sans-serif" font-size="11" fill="#202124">`,
    `<rect width="${width}" height="${height}" fill="white"/>`,
    ...parts,
    "</svg>",
    "",
  ].join("\n");
}

/** A figure short enough for a bar's end: 129k, 1.2, 0.05. */
function format(value: number): string {
  if (value >= 10_000) return `${Math.round(value / 1000)}k`;
  if (value >= 100) return `${Math.round(value)}`;
  return value >= 1 ? value.toFixed(1) : value.toFixed(2);
}

function escape(content: string): string {
  return content.replaceAll("&", "&amp;").replaceAll("<", "&lt;").replaceAll(">", "&gt;");
}
