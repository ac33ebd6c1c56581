// lenient-node: a tiny MCP server that reads request bodies the way Node servers commonly do
// (body-parser, express.json, the TypeScript SDK's own transport): raw-body collects the body
// and decodes it through iconv-lite with the charset named in Content-Type (parsed by the
// content-type package; utf-8 when there is none), then JSON.parse. So utf-7, utf-16le,
// latin1, ... bodies all decode; a BOM is dropped; duplicate keys: the last wins.
//
// Every path and every HTTP method is served the same way. A tools/call is executed: one JSON
// line {"tool": <name as read>, "arguments": <arguments as read>} is appended to the --log
// file (synchronously) before the answer is sent.
//
// Usage: node server.js --listen 127.0.0.1:PORT --log executions.jsonl [--requests requests.jsonl]
// Prints "listening <addr>" on stdout once bound.
'use strict';

const fs = require('fs');
const http = require('http');
const contentType = require('content-type');
const getRawBody = require('raw-body');

function args(argv) {
  const out = { listen: '127.0.0.1:0', log: '', requests: '' };
  for (let i = 0; i < argv.length; i++) {
    const m = /^--(listen|log|requests)$/.exec(argv[i]);
    if (!m || i + 1 >= argv.length) {
      process.stderr.write(`lenient-node: bad argument ${argv[i]}\n`);
      process.exit(2);
    }
    out[m[1]] = argv[++i];
  }
  if (!out.log) {
    process.stderr.write('lenient-node: --log is required\n');
    process.exit(2);
  }
  return out;
}

const opts = args(process.argv.slice(2));

function logLine(path, v) {
  if (path) fs.appendFileSync(path, JSON.stringify(v) + '\n');
}

function schema(props) {
  return { type: 'object', properties: props };
}

const TOOLS = [
  { name: 'echo', description: 'Echo text', inputSchema: schema({ text: { type: 'string' } }) },
  { name: 'secret_dump', description: 'Dump secrets', inputSchema: schema({}) },
  { name: 'start_security_scan', description: 'Start a scan', inputSchema: schema({ cluster: { type: 'string' } }) },
  { name: 'drop_cluster', description: 'Drop a cluster', inputSchema: schema({ cluster: { type: 'string' } }) },
  { name: 'transfer', description: 'Transfer money', inputSchema: schema({ amount: { type: 'number' }, to: { type: 'string' } }) },
];

function rpcError(id, code, message) {
  return { jsonrpc: '2.0', id, error: { code, message } };
}

// The response to one message, or null for a notification or a response.
function answer(m) {
  if (m === null || typeof m !== 'object' || Array.isArray(m)) {
    return rpcError(null, -32600, 'Invalid Request');
  }
  if (typeof m.method !== 'string' || m.id === undefined || m.id === null) {
    return null;
  }
  const params = m.params && typeof m.params === 'object' ? m.params : {};
  let result;
  switch (m.method) {
    case 'initialize':
      result = {
        protocolVersion: typeof params.protocolVersion === 'string' ? params.protocolVersion : '2025-06-18',
        capabilities: { tools: {} },
        serverInfo: { name: 'lenient-node', version: '1' },
      };
      break;
    case 'tools/list':
      result = { tools: TOOLS };
      break;
    case 'tools/call':
      logLine(opts.log, { tool: params.name, arguments: params.arguments });
      result = { content: [{ type: 'text', text: `node ran ${params.name}` }] };
      break;
    default:
      result = {};
  }
  return { jsonrpc: '2.0', id: m.id, result };
}

function send(res, status, v) {
  const body = Buffer.from(JSON.stringify(v));
  res.writeHead(status, { 'Content-Type': 'application/json', 'Content-Length': body.length });
  res.end(body);
}

function charset(req) {
  try {
    return contentType.parse(req).parameters.charset || 'utf-8';
  } catch (e) {
    return 'utf-8'; // no Content-Type, or one content-type cannot parse
  }
}

const server = http.createServer((req, res) => {
  getRawBody(req, { length: req.headers['content-length'], limit: '16mb', encoding: charset(req) }, (err, text) => {
    logLine(opts.requests, { method: req.method, path: req.url, length: err ? -1 : text.length });
    if (err) {
      send(res, err.status || 400, rpcError(null, -32700, `Parse error: ${err.message}`));
      return;
    }
    let parsed;
    try {
      parsed = JSON.parse(text);
    } catch (e) {
      send(res, 400, rpcError(null, -32700, `Parse error: ${e.message}`));
      return;
    }
    const batch = Array.isArray(parsed);
    const out = (batch ? parsed : [parsed]).map(answer).filter((r) => r !== null);
    if (out.length === 0) {
      res.writeHead(202, { 'Content-Length': 0 });
      res.end();
      return;
    }
    send(res, 200, batch ? out : out[0]);
  });
});

const i = opts.listen.lastIndexOf(':');
const host = opts.listen.slice(0, i).replace(/^\[|\]$/g, '');
const port = Number(opts.listen.slice(i + 1));
server.on('error', (e) => {
  process.stderr.write(`lenient-node: ${e.message}\n`);
  process.exit(1);
});
server.listen(port, host, () => {
  const a = server.address();
  const shown = a.family === 'IPv6' || a.family === 6 ? `[${a.address}]:${a.port}` : `${a.address}:${a.port}`;
  process.stdout.write(`listening ${shown}\n`);
});
