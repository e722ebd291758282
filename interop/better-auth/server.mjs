// A real Better Auth server, configured the way the frontend's is, on the service's database.
//
//   node server.mjs migrate   create or update Better Auth's tables (what `npx @better-auth/cli
//                             migrate` does), then exit
//   node server.mjs serve     serve /api/auth/* (and the test page) on PORT
//
// Environment: DATABASE_URL, BETTER_AUTH_SECRET, BETTER_AUTH_URL (its base URL, also the
// JWT plugin's iss and aud), PORT (default 3000), API_URL (the task API, for the test page),
// EXTRA_PORT (optional: the same test page on a second port, a different origin), CLIENT_JS
// (optional: the compiled TypeScript client, served to the test page as /client.js).
import { readFile } from "node:fs/promises";
import http from "node:http";

import { betterAuth } from "better-auth";
import { getMigrations } from "better-auth/db/migration";
import { toNodeHandler } from "better-auth/node";
import { bearer, jwt } from "better-auth/plugins";
import { SignJWT } from "jose";
import pg from "pg";

const env = (name) => {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set`);
  return value;
};

const baseURL = env("BETTER_AUTH_URL");
const secret = env("BETTER_AUTH_SECRET");
const pool = new pg.Pool({ connectionString: env("DATABASE_URL"), max: 5 });

export const auth = betterAuth({
  baseURL,
  secret,
  database: pool,
  emailAndPassword: { enabled: true },
  user: { deleteUser: { enabled: true } },
  session: {
    // The `better-auth.session_data` cookie: HS256 with the secret, the session and user inside.
    cookieCache: { enabled: true, maxAge: 5 * 60, strategy: "jwt" },
  },
  plugins: [
    jwt(), // /api/auth/token, /api/auth/jwks, the set-auth-jwt header; EdDSA (Ed25519)
    bearer(), // the session token as `Authorization: Bearer`, for clients without cookies
  ],
  telemetry: { enabled: false },
});

const authHandler = toNodeHandler(auth);

// What a Next.js route handler does to mint the spec's token (kind 1): the signed-in user's id
// as `sub`, HS256 with the shared secret, via `jose`.
async function hs256Token(req, res) {
  const session = await auth.api.getSession({ headers: new Headers(req.headers) });
  if (!session) return send(res, 401, { error: "not signed in" });
  const token = await new SignJWT({ sub: session.user.id })
    .setProtectedHeader({ alg: "HS256", typ: "JWT" })
    .setIssuedAt()
    .setExpirationTime("15m")
    .sign(new TextEncoder().encode(secret));
  return send(res, 200, { token });
}

function send(res, status, body, type = "application/json") {
  const payload = type === "application/json" ? JSON.stringify(body) : body;
  res.writeHead(status, { "Content-Type": type, "Cache-Control": "no-store" });
  res.end(payload);
}

async function page(req, res) {
  const html = await readFile(new URL("./page.html", import.meta.url), "utf8");
  send(res, 200, html.replace("__API_URL__", env("API_URL")), "text/html; charset=utf-8");
}

async function clientModule(req, res) {
  const path = process.env.CLIENT_JS;
  if (!path) return send(res, 404, { error: "CLIENT_JS is not set" });
  send(res, 200, await readFile(path, "utf8"), "text/javascript; charset=utf-8");
}

function handle(req, res) {
  const path = new URL(req.url, "http://x").pathname;
  const respond = path.startsWith("/api/auth/")
    ? authHandler(req, res)
    : path === "/api/hs256-token"
      ? hs256Token(req, res)
      : path === "/" || path === "/index.html"
        ? page(req, res)
        : path === "/client.js"
          ? clientModule(req, res)
          : send(res, 404, { error: "not found" });
  Promise.resolve(respond).catch((error) => {
    console.error(error);
    if (!res.headersSent) send(res, 500, { error: String(error) });
  });
}

async function migrate() {
  const { toBeCreated, toBeAdded, runMigrations } = await getMigrations(auth.options);
  console.log(
    JSON.stringify({
      event: "migrate",
      create: toBeCreated.map((t) => t.table),
      add: toBeAdded.map((t) => ({ table: t.table, fields: Object.keys(t.fields) })),
    }),
  );
  await runMigrations();
}

const command = process.argv[2] ?? "serve";
if (command === "migrate") {
  await migrate();
  await pool.end();
} else if (command === "serve") {
  const ports = [Number(process.env.PORT ?? 3000)];
  if (process.env.EXTRA_PORT) ports.push(Number(process.env.EXTRA_PORT));
  for (const port of ports) {
    await new Promise((resolve, reject) => {
      const server = http.createServer(handle);
      server.once("error", reject);
      server.listen(port, resolve); // all interfaces: "localhost" may be ::1 or 127.0.0.1
    });
  }
  console.log(JSON.stringify({ event: "listening", ports, baseURL }));
} else {
  console.error(`unknown command ${command}: use migrate or serve`);
  process.exit(2);
}
