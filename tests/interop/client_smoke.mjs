// Drives the compiled TypeScript client (clients/typescript) against the live API, the way the
// frontend's lib/api.ts would, and prints what it saw as one JSON line.
// Usage: node client_smoke.mjs <dist/index.js> <api-url> <user-id> <token>
const [clientPath, baseUrl, userId, token] = process.argv.slice(2);
const { createTodoApi, ApiError, etagOf, wasReplayed } = await import(clientPath);

const api = createTodoApi({ baseUrl, getToken: async () => token });
const seen = {};
const created = await api.createTask(userId, { title: "  from the TS client  " });
seen.created = created;
seen.listed = await api.listTasks(userId);
seen.pending = await api.listTasks(userId, "pending");
seen.got = await api.getTask(userId, created.id);
seen.replaced = await api.replaceTask(userId, created.id, { title: "replaced", description: "d" });
seen.updated = await api.updateTask(userId, created.id, { description: null });
seen.toggled = await api.toggleTask(userId, created.id);
seen.deleted = await api.deleteTask(userId, created.id);
for (const [name, call] of [
  ["missing", () => api.getTask(userId, created.id)],
  ["invalid", () => api.createTask(userId, { title: "" })],
  ["forbidden", () => api.listTasks(`${userId}-other`)],
  ["unauthenticated", () => createTodoApi({ baseUrl, getToken: () => "nope" }).listTasks(userId)],
]) {
  try {
    await call();
    seen[name] = "no error";
  } catch (error) {
    seen[name] = {
      isApiError: error instanceof ApiError,
      status: error.status,
      detail: error.detail,
      problems: error.problems.map((p) => p.loc),
      requestId: Boolean(error.requestId),
    };
  }
}

// Safe retries. A fetch that loses the first answer of each write after the server stored it
// (as a connection cut mid-response does), and one that first meets a 503: the client retries
// with the same Idempotency-Key, so each write happens once.
const sentKeys = [];
let lose = 0;
let unavailable = 0;
const flaky = async (url, init) => {
  if (init.method !== "GET") sentKeys.push(init.headers["Idempotency-Key"]);
  if (init.method === "DELETE" && unavailable++ === 0) {
    return new Response(JSON.stringify({ detail: "down" }), {
      status: 503,
      headers: { "Retry-After": "0", "Content-Type": "application/json" },
    });
  }
  const response = await fetch(url, init);
  if (init.method !== "GET" && lose++ % 2 === 0) throw new TypeError("fetch failed");
  return response;
};
const retrying = createTodoApi({
  baseUrl,
  getToken: () => token,
  fetch: flaky,
  retry: { baseDelayMs: 5, maxDelayMs: 50 },
});
const once = await retrying.createTask(userId, { title: "once, despite a lost answer" });
seen.retried = {
  replayed: wasReplayed(once),
  etag: etagOf(once),
  titles: (await api.listTasks(userId)).map((t) => t.title),
};
const toggledOnce = await retrying.toggleTask(userId, once.id);
seen.retried.toggled = { completed: toggledOnce.completed, replayed: wasReplayed(toggledOnce) };
const deletedOnce = await retrying.deleteTask(userId, once.id);
seen.retried.deleted = { id: deletedOnce.id === once.id, replayed: wasReplayed(deletedOnce) };
seen.retried.keys = sentKeys.length;
seen.retried.distinctKeys = new Set(sentKeys).size;
seen.retried.left = await api.listTasks(userId);

// Concurrent edits: the ETag of a copy, If-Match on a write, and conditional reads.
const mine = await api.createTask(userId, { title: "edited in two tabs" });
const tabOne = await api.getTask(userId, mine.id);
seen.etags = { created: etagOf(mine), got: etagOf(tabOne) };
const savedByOne = await api.updateTask(
  userId,
  mine.id,
  { title: "tab one" },
  { ifMatch: etagOf(tabOne) },
);
seen.etags.afterEdit = etagOf(savedByOne);
try {
  await api.updateTask(userId, mine.id, { title: "tab two" }, { ifMatch: etagOf(tabOne) });
  seen.stale = "no error";
} catch (error) {
  seen.stale = { status: error.status, detail: error.detail };
}
const gotAgain = await api.getTask(userId, mine.id, { cached: savedByOne });
seen.sameWhileUnchanged = gotAgain === savedByOne;
const list = await api.listTasks(userId);
seen.listSameWhileUnchanged = (await api.listTasks(userId, undefined, { cached: list })) === list;
await api.toggleTask(userId, mine.id, { ifMatch: "*" });
const fresh = await api.getTask(userId, mine.id, { cached: savedByOne });
seen.afterToggle = { same: fresh === savedByOne, completed: fresh.completed, etag: etagOf(fresh) };
seen.listAfterToggle = (await api.listTasks(userId, undefined, { cached: list })) === list;
await api.deleteTask(userId, mine.id, { ifMatch: etagOf(fresh) });
console.log(JSON.stringify(seen));
