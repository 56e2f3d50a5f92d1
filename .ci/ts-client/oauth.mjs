// The official MCP TypeScript SDK's OAuth client connecting to this server over HTTP: it starts
// with no token, follows the 401 to the Protected Resource Metadata and the authorization server
// it names, registers itself (dynamic registration), sends the person to authorize (PKCE), redeems
// the code and calls a tool with the token. Then, with its access token spoiled, it must refresh
// its way back in, when the authorization server issues refresh tokens.
//
// This script plays the person's browser: it follows the redirects, and on the built-in server's
// consent page signs in as the operator and allows the client to act as the given agent.
//
//   node oauth.mjs <mcp url> <project name> [<operator> <password> <agent>]
//
// Prints the created project as JSON on stdout.
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { UnauthorizedError } from "@modelcontextprotocol/sdk/client/auth.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";

const [mcpUrl, projectName, operator, password, agent] = process.argv.slice(2);
const REDIRECT = "http://127.0.0.1:9/oauth/callback";

function check(condition, what) {
  if (!condition) throw new Error(`check failed: ${what}`);
}

class MemoryProvider {
  constructor() {
    this.client = undefined;
    this.saved = undefined;
    this.verifier = undefined;
    this.authorizationUrl = undefined;
  }
  get redirectUrl() {
    return REDIRECT;
  }
  get clientMetadata() {
    return {
      client_name: "ts-sdk-oauth-check",
      redirect_uris: [REDIRECT],
      grant_types: ["authorization_code", "refresh_token"],
      response_types: ["code"],
      token_endpoint_auth_method: "none",
    };
  }
  state() {
    return "ts-state-" + Math.random().toString(36).slice(2);
  }
  clientInformation() {
    return this.client;
  }
  saveClientInformation(info) {
    this.client = info;
  }
  tokens() {
    return this.saved;
  }
  saveTokens(tokens) {
    this.saved = tokens;
  }
  redirectToAuthorization(url) {
    this.authorizationUrl = url;
  }
  saveCodeVerifier(verifier) {
    this.verifier = verifier;
  }
  codeVerifier() {
    return this.verifier;
  }
}

// The browser: from the authorization URL to the code the client's redirect URI receives.
async function browse(authorizationUrl) {
  let response = await fetch(authorizationUrl, { redirect: "manual" });
  let location = new URL(response.headers.get("location"), authorizationUrl);
  if (!location.href.startsWith(REDIRECT)) {
    // The built-in server's consent page: read it, sign in, allow.
    const page = await fetch(location);
    check(page.status === 200, `the consent page opens (${page.status})`);
    const html = await page.text();
    check(html.includes("ts-sdk-oauth-check"), "the consent page names the client");
    const form = new URLSearchParams({
      request: location.searchParams.get("request"),
      operator,
      password,
      agent,
      decision: "allow",
    });
    response = await fetch(new URL("/oauth/consent", location), {
      method: "POST",
      body: form,
      redirect: "manual",
      headers: { Origin: location.origin },
    });
    check(response.status === 303, `the consent page sends the browser back (${response.status})`);
    location = new URL(response.headers.get("location"));
  }
  check(location.href.startsWith(REDIRECT), `the browser returns to the client: ${location.href}`);
  check(location.searchParams.get("state") === new URL(authorizationUrl).searchParams.get("state"), "state");
  return location.searchParams.get("code");
}

async function connected(provider) {
  const client = new Client({ name: "ts-sdk-oauth-check", version: "1.0.0" });
  await client.connect(new StreamableHTTPClientTransport(new URL(mcpUrl), { authProvider: provider }));
  return client;
}

const provider = new MemoryProvider();
const first = new StreamableHTTPClientTransport(new URL(mcpUrl), { authProvider: provider });
let refused = false;
try {
  await new Client({ name: "ts-sdk-oauth-check", version: "1.0.0" }).connect(first);
} catch (error) {
  check(error instanceof UnauthorizedError, `the first connection asks for authorization: ${error}`);
  refused = true;
}
check(refused && provider.authorizationUrl, "the client was sent to authorize");
check(provider.client?.client_id, "the client registered itself");
await first.finishAuth(await browse(provider.authorizationUrl));
check(provider.saved?.access_token, "the client holds an access token");

let client = await connected(provider);
const result = await client.callTool({ name: "create_project", arguments: { name: projectName } });
check(!result.isError, `create_project succeeds: ${JSON.stringify(result.content)}`);
await client.close();

if (provider.saved.refresh_token) {
  const spent = provider.saved.access_token;
  provider.saved = { ...provider.saved, access_token: "mto_no-longer-valid" };
  client = await connected(provider);
  check(provider.saved.access_token !== "mto_no-longer-valid" && provider.saved.access_token !== spent, "refreshed");
  const found = await client.callTool({ name: "search_tasks", arguments: {} });
  check(!found.isError, "a call with the refreshed token succeeds");
  await client.close();
  console.error("TypeScript SDK OAuth client: refreshed its token");
}
process.stdout.write(JSON.stringify(result.structuredContent) + "\n");
console.error(`TypeScript SDK OAuth client against ${mcpUrl}: passed`);
