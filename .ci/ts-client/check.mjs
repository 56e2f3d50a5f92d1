// The official MCP TypeScript SDK's client against this server, as a JavaScript agent would use
// it: over stdio (the SDK starts the server), over HTTP with a bearer token, and over stateless
// HTTP. The SDK checks each structured result against the tool's output schema itself.
//
//   node check.mjs <python> <database url> <http url> <stateless http url> <token>
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StdioClientTransport } from "@modelcontextprotocol/sdk/client/stdio.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";

const [python, databaseUrl, httpUrl, statelessUrl, token] = process.argv.slice(2);

function check(condition, what) {
  if (!condition) throw new Error(`check failed: ${what}`);
}

async function call(client, name, args) {
  const result = await client.callTool({ name, arguments: args });
  check(!result.isError, `${name} succeeds: ${JSON.stringify(result.content)}`);
  return result.structuredContent;
}

async function exercise(label, transport) {
  const client = new Client({ name: "ts-sdk-check", version: "1.0.0" });
  await client.connect(transport);
  const { tools } = await client.listTools();
  check(tools.some((tool) => tool.name === "search_tasks" && tool.outputSchema), `${label}: tools/list`);
  const project = await call(client, "create_project", { name: `from TypeScript over ${label}` });
  const task = await call(client, "create_task", { title: `a task over ${label}`, project_id: project.id });
  const inProject = { field: "project_id", op: "eq", value: project.id };
  const found = await call(client, "search_tasks", { filter: inProject, limit: 10 });
  check(found.items.length === 1 && found.items[0].id === task.id, `${label}: search finds the task`);
  const updated = await call(client, "update_task", { task_id: task.id, status: "blocked", expected_version: task.version });
  check(updated.status === "blocked" && updated.version === task.version + 1, `${label}: update`);
  const wrong = await client.callTool({ name: "search_tasks", arguments: { filter: "status=pending" } });
  check(wrong.isError && wrong.content[0].text.includes("filter must be a filter object"), `${label}: a bad filter`);
  const read = await client.readResource({ uri: `task://${task.id}` });
  check(JSON.parse(read.contents[0].text).status === "blocked", `${label}: task:// resource`);
  const { resourceTemplates } = await client.listResourceTemplates();
  check(resourceTemplates.length === 3, `${label}: resource templates`);
  const trail = await call(client, "get_audit_trail", { entity_id: task.id });
  check(trail.items.map((entry) => entry.action).join() === "updated,created", `${label}: audit trail`);
  await client.close();
  console.error(`TypeScript SDK over ${label}: passed`);
}

const headers = { Authorization: `Bearer ${token}` };
await exercise(
  "stdio",
  new StdioClientTransport({
    command: python,
    args: ["-m", "mcp_server", "serve"],
    env: { ...process.env, DATABASE_URL: databaseUrl, MCP_AGENT_ID: "ts-sdk" },
    stderr: "inherit",
  }),
);
await exercise("HTTP", new StreamableHTTPClientTransport(new URL(httpUrl), { requestInit: { headers } }));
await exercise("stateless HTTP", new StreamableHTTPClientTransport(new URL(statelessUrl), { requestInit: { headers } }));
