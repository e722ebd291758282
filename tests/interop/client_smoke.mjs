// Drives the compiled TypeScript client (clients/typescript) against the live API, the way the
// frontend's lib/api.ts would, and prints what it saw as one JSON line.
// Usage: node client_smoke.mjs <dist/index.js> <api-url> <user-id> <token>
const [clientPath, baseUrl, userId, token] = process.argv.slice(2);
const { createTodoApi, ApiError } = await import(clientPath);

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
console.log(JSON.stringify(seen));
