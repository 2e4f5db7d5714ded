/* Troupe playground: the chat card's "Tools and JSON output" panel. Offers one function
   tool (name, description, JSON Schema for its parameters) with tool_choice auto, required
   or named, shows the model's calls as they stream, and sends the tool's result back as a
   `tool` message; a JSON-schema toggle asks for response_format json_schema and shows a
   parsed answer pretty-printed. Plain JS, no dependencies; rides on app.js's chat. */
(() => {
  "use strict";
  const $ = (id) => document.getElementById(id);
  const pg = window.troupePlayground;
  const el = pg.el;

  const PRESET = {
    name: "get_weather",
    description: "The current weather in a city.",
    parameters: {
      type: "object",
      properties: {
        city: { type: "string", description: "City name, e.g. Paris" },
        unit: { type: "string", enum: ["celsius", "fahrenheit"] },
      },
      required: ["city"],
    },
  };
  const JSON_PRESET = {
    type: "object",
    properties: { name: { type: "string" }, age: { type: "integer", minimum: 0 } },
    required: ["name", "age"],
    additionalProperties: false,
  };
  const pretty = (value) => JSON.stringify(value, null, 2);

  function loadPreset() {
    $("tool-name").value = PRESET.name;
    $("tool-desc").value = PRESET.description;
    $("tool-params").value = pretty(PRESET.parameters);
    problem(null);
  }
  function problem(text) {
    const p = $("agent-problem");
    p.textContent = text || "";
    p.hidden = !text;
  }
  function parseSchema(id, what) {
    try {
      const value = JSON.parse($(id).value);
      if (value && typeof value === "object" && !Array.isArray(value)) return value;
    } catch (e) {
      problem(`${what} is not valid JSON: ${e.message}`);
      $(id).focus();
      return null;
    }
    problem(`${what} must be a JSON object (a JSON Schema).`);
    $(id).focus();
    return null;
  }

  // The request fields the panel adds: tools / tool_choice and response_format. ``followUp``
  // (a tool result going back): a forced choice becomes auto, so the model can answer
  // instead of calling again. Returns null (and says why) when a schema does not parse.
  function requestFields(followUp) {
    const fields = {};
    problem(null);
    if ($("tools-on").checked) {
      const name = $("tool-name").value.trim();
      if (!/^[A-Za-z0-9_-]{1,64}$/.test(name)) {
        problem("The function name must be 1–64 letters, digits, '_' or '-'.");
        $("tool-name").focus();
        return null;
      }
      const parameters = parseSchema("tool-params", "The parameters schema");
      if (parameters === null) return null;
      const fn = { name, parameters };
      if ($("tool-desc").value.trim()) fn.description = $("tool-desc").value.trim();
      fields.tools = [{ type: "function", function: fn }];
      const choice = followUp ? "auto" : $("tool-choice").value;
      fields.tool_choice = choice === "named" ? { type: "function", function: { name } } : choice;
    }
    if ($("json-on").checked) {
      const schema = parseSchema("json-schema", "The JSON output schema");
      if (schema === null) return null;
      fields.response_format = { type: "json_schema", json_schema: { name: "answer", schema, strict: true } };
    }
    return fields;
  }

  // One box per call in the reply, filled as its fragments stream in.
  function callBox(reply, index) {
    if (!reply.calls[index]) {
      const box = el("div", "tool-call");
      const head = el("div", "call-head");
      head.append(el("span", "muted", "Tool call "), el("code", "call-name", ""));
      const args = el("pre", "call-args", "");
      box.append(head, args);
      reply.box.insertBefore(box, reply.body.nextSibling);
      reply.calls[index] = { id: null, name: "", arguments: "", box, args };
    }
    return reply.calls[index];
  }
  function onToolCall(reply, msg) {
    const call = callBox(reply, msg.index || 0);
    if (msg.id) call.id = msg.id;
    if (msg.name) { call.name = msg.name; call.box.querySelector(".call-name").textContent = msg.name; }
    call.arguments += msg.arguments || "";
    call.args.textContent = call.arguments;
  }

  function onComplete(reply, msg) {
    (msg.tool_calls || []).forEach((c) => {
      const call = callBox(reply, c.index || 0);
      Object.assign(call, { id: c.id, name: c.name, arguments: c.arguments });
      call.box.querySelector(".call-name").textContent = c.name;
      try { call.args.textContent = pretty(JSON.parse(c.arguments)); } catch (e) { call.args.textContent = c.arguments; }
    });
    if (msg.tool_calls && msg.tool_calls.length) answerForm(reply, msg.tool_calls);
    if (reply.json && reply.text) showJson(reply);
  }

  function showJson(reply) {
    let value;
    try { value = JSON.parse(reply.text); } catch (e) {
      reply.box.append(el("div", "note error", "The answer is not valid JSON."));
      return;
    }
    reply.body.textContent = pretty(value);
    reply.box.classList.add("json");
    reply.box.append(el("div", "note json-ok", "JSON answer (parsed)"));
  }

  // A result box per call; sending them appends `tool` messages and asks for the answer.
  function answerForm(reply, calls) {
    const form = el("form", "tool-answer");
    const inputs = calls.map((c, i) => {
      const id = `${reply.id}-result-${i}`;
      const label = el("label", "small", `Result of ${c.name}`);
      label.htmlFor = id;
      const area = el("textarea", "tool-result");
      area.id = id;
      area.rows = 2;
      area.placeholder = '{"temperature_c": 21}';
      form.append(label, area);
      return area;
    });
    const go = el("button", "send-result", calls.length > 1 ? "Send results" : "Send result");
    go.type = "submit";
    form.append(go);
    form.addEventListener("submit", (ev) => {
      ev.preventDefault();
      const fields = requestFields(true);
      if (fields === null) return;
      calls.forEach((c, i) => pg.state.conversation.push({ role: "tool", tool_call_id: c.id, content: inputs[i].value }));
      form.querySelectorAll("textarea, button").forEach((n) => { n.disabled = true; });
      pg.startReply(reply.model, null, fields);
    });
    reply.box.append(form);
    inputs[0].focus();
  }

  function init() {
    loadPreset();
    $("json-schema").value = pretty(JSON_PRESET);
    $("tool-preset").addEventListener("click", loadPreset);
  }

  pg.agent = { requestFields, onToolCall, onComplete };
  init();
})();
