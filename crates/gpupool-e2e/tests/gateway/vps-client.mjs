// A video app on a VPS, as the gateway's users write one: axios, an API key, synchronous
// POSTs of videos to caption, a few at a time. The e2e tests run it unchanged against a real
// gateway and check what it saw (crates/gpupool-e2e/tests/e2e/nodeclient.rs).
//
// Environment:
//   GATEWAY_URL         the gateway's base URL (required), e.g. http://127.0.0.1:8090
//   API_KEY             sent as X-API-Key (required; may be empty for --insecure-no-auth)
//   REQUESTS            how many requests (50)
//   CONCURRENCY         how many in flight at once (10)
//   OPERATION           POST /video/$OPERATION (caption)
//   IDEMPOTENCY_PREFIX  when set, request i carries the header IDEMPOTENCY_HEADER
//                       (Idempotency-Key) with the value $IDEMPOTENCY_PREFIX$i
//   AXIOS_DIR           where axios is: the directory `hack/nodeclients.sh --axios` prints, or
//                       the axios package itself; without it, axios comes from NODE_PATH
//
// Request i (0-based) has the body {"videoUrl": "https://example.com/v/<i>.mp4",
// "language": "en", "n": i}, no Prefer header (the gateway answers when the job is done), and a
// 120 s timeout. Prints ONE JSON line on stdout:
//   {"requests", "ok" (answers with status 200), "statuses" ({"200": n, ...}; "error" counts
//    requests with no HTTP answer), "p50Ms", "p99Ms" (nearest rank, over every request),
//    "results": [{"i", "status" (null without an answer), "latencyMs", "body", "error"?}]}
// and exits 0 whatever the gateway answered: the test decides what is a failure. Only a
// missing setting exits non-zero.

import { createRequire } from "node:module";
import { existsSync } from "node:fs";
import { join } from "node:path";
import { performance } from "node:perf_hooks";

const require = createRequire(import.meta.url);

function loadAxios() {
  const dir = process.env.AXIOS_DIR;
  if (!dir) return require("axios"); // NODE_PATH
  const installed = join(dir, "node_modules", "axios");
  return require(existsSync(installed) ? installed : dir);
}

function setting(name, fallback) {
  const v = process.env[name];
  if (v !== undefined) return v;
  if (fallback === undefined) {
    console.error(`vps-client: ${name} is required`);
    process.exit(2);
  }
  return fallback;
}

function count(name, fallback) {
  const n = Number(setting(name, String(fallback)));
  if (!Number.isInteger(n) || n < 1) {
    console.error(`vps-client: ${name} must be a positive integer`);
    process.exit(2);
  }
  return n;
}

/** Nearest-rank percentile of sorted numbers. */
function percentile(sorted, p) {
  if (sorted.length === 0) return null;
  const rank = Math.ceil((p / 100) * sorted.length);
  return sorted[Math.min(sorted.length, Math.max(1, rank)) - 1];
}

const axios = loadAxios();
const base = setting("GATEWAY_URL").replace(/\/+$/, "");
const apiKey = setting("API_KEY");
const requests = count("REQUESTS", 50);
const concurrency = count("CONCURRENCY", 10);
const operation = setting("OPERATION", "caption");
const idempotencyPrefix = process.env.IDEMPOTENCY_PREFIX;
const idempotencyHeader = setting("IDEMPOTENCY_HEADER", "Idempotency-Key");
const url = `${base}/video/${encodeURIComponent(operation)}`;

async function one(i) {
  const headers = { "X-API-Key": apiKey };
  if (idempotencyPrefix !== undefined) headers[idempotencyHeader] = `${idempotencyPrefix}${i}`;
  const body = { videoUrl: `https://example.com/v/${i}.mp4`, language: "en", n: i };
  const start = performance.now();
  try {
    const res = await axios.post(url, body, {
      headers,
      timeout: 120_000,
      // Every status is an answer to record, not an exception.
      validateStatus: () => true,
    });
    const latencyMs = performance.now() - start;
    return { i, status: res.status, latencyMs, body: res.data };
  } catch (err) {
    const latencyMs = performance.now() - start;
    return { i, status: null, latencyMs, body: null, error: `${err.code ?? "ERROR"}: ${err.message}` };
  }
}

const results = new Array(requests);
let next = 0;
async function worker() {
  while (next < requests) {
    const i = next++;
    results[i] = await one(i);
  }
}
await Promise.all(Array.from({ length: Math.min(concurrency, requests) }, worker));

const statuses = {};
for (const r of results) {
  const key = r.status === null ? "error" : String(r.status);
  statuses[key] = (statuses[key] ?? 0) + 1;
}
const latencies = results.map((r) => r.latencyMs).sort((a, b) => a - b);
const round = (ms) => (ms === null ? null : Math.round(ms * 10) / 10);
for (const r of results) r.latencyMs = round(r.latencyMs);
console.log(
  JSON.stringify({
    requests,
    ok: statuses["200"] ?? 0,
    statuses,
    p50Ms: round(percentile(latencies, 50)),
    p99Ms: round(percentile(latencies, 99)),
    results,
  }),
);
