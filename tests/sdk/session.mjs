// Drives one OpenCode session with the official SDK (@opencode-ai/sdk), unchanged, through
// agentd's proxy: BASE_URL is .../v1/sandboxes/{id}/opencode, TOKEN agentd's bearer token.
// Prints one JSON line: the session id, the number of messages and the last assistant text.
import { createOpencodeClient } from "@opencode-ai/sdk";

const timer = setTimeout(() => {
  console.error("timed out waiting for session.idle");
  process.exit(2);
}, 90_000);

const client = createOpencodeClient({
  baseUrl: process.env.BASE_URL,
  headers: { Authorization: `Bearer ${process.env.TOKEN}` },
});
const created = await client.session.create({ body: { title: "sdk" } });
if (!created.data) throw new Error(`session.create failed: ${JSON.stringify(created.error)}`);
const session = created.data;
const events = await client.event.subscribe();
const sent = await client.session.promptAsync({
  path: { id: session.id },
  body: { parts: [{ type: "text", text: "write the file" }] },
});
if (sent.error) throw new Error(`promptAsync failed: ${JSON.stringify(sent.error)}`);
const seen = [];
for await (const ev of events.stream) {
  seen.push(ev.type);
  if (ev.type === "session.idle" && ev.properties?.sessionID === session.id) break;
}
const msgs = (await client.session.messages({ path: { id: session.id } })).data ?? [];
const texts = msgs
  .filter((m) => m.info.role === "assistant")
  .flatMap((m) => m.parts.filter((p) => p.type === "text").map((p) => p.text));
const tools = msgs.flatMap((m) => m.parts.filter((p) => p.type === "tool").map((p) => p.tool));
console.log(JSON.stringify({ session: session.id, messages: msgs.length, text: texts.at(-1) ?? "", tools, events: seen.length }));
clearTimeout(timer);
process.exit(0);
