-- One operation of the Todo API under wrk, set by bench/run.py through the environment:
--   BENCH_METHOD, BENCH_PATH (may hold "{id}"), BENCH_BODY, BENCH_TOKEN,
--   BENCH_IDS: a file of task ids, one a line, substituted for "{id}" in turn. Each wrk thread
--   takes every n-th id (n = BENCH_THREADS), so that no id is deleted twice.
-- Prints one line: "BENCH requests=... seconds=... p50_ms=... p99_ms=... non2xx=... errors=...".

local thread_count = 0

function setup(thread)
  thread_count = thread_count + 1
  thread:set("thread_index", thread_count)
end

function init(args)
  method = os.getenv("BENCH_METHOD") or "GET"
  template = os.getenv("BENCH_PATH")
  body = os.getenv("BENCH_BODY")
  if body == "" then body = nil end
  headers = { ["Authorization"] = "Bearer " .. os.getenv("BENCH_TOKEN") }
  if body then headers["Content-Type"] = "application/json" end
  ids = {}
  local ids_file = os.getenv("BENCH_IDS")
  if ids_file and ids_file ~= "" then
    for line in io.lines(ids_file) do ids[#ids + 1] = line end
  end
  stride = tonumber(os.getenv("BENCH_THREADS") or "1")
  next_index = thread_index or 1
end

function request()
  local path = template
  if #ids > 0 then
    path = template:gsub("{id}", ids[((next_index - 1) % #ids) + 1])
    next_index = next_index + stride
  end
  return wrk.format(method, path, headers, body)
end

function done(summary, latency, requests)
  local errors = summary.errors
  io.write(string.format(
    "BENCH requests=%d seconds=%.3f p50_ms=%.2f p99_ms=%.2f non2xx=%d errors=%d\n",
    summary.requests, summary.duration / 1e6,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000,
    errors.status, errors.connect + errors.read + errors.write + errors.timeout))
end
