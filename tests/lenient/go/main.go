// lenient-go: a tiny MCP server whose JSON-RPC messages are decoded as Go servers decode them
// (hand-written ones, and the Go MCP SDK before v1.3.1), with encoding/json's json.Unmarshal
// into Go structs. So object keys match struct fields case-insensitively ("Method", "PARAMS",
// "NAME" all count, and U+017F/U+212A fold to s/k), the last of duplicate keys wins, and
// invalid UTF-8 inside strings becomes U+FFFD. Method names are compared case-sensitively on
// the decoded value, as the Go SDK does.
//
// Every path and every HTTP method is served the same way. A tools/call is executed: one JSON
// line {"tool": <name as decoded>, "arguments": <arguments as decoded>} is appended to the
// --log file before the answer is sent.
//
// Usage: lenient-go --listen 127.0.0.1:PORT --log executions.jsonl [--requests requests.jsonl]
// Prints "listening <addr>" on stdout once bound.
package main

import (
	"bytes"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"sync"
)

// message is one JSON-RPC message as a Go server decodes it.
type message struct {
	JSONRPC string          `json:"jsonrpc"`
	ID      json.RawMessage `json:"id"`
	Method  string          `json:"method"`
	Params  json.RawMessage `json:"params"`
	Result  json.RawMessage `json:"result"`
	Error   json.RawMessage `json:"error"`
}

type callParams struct {
	Name      string          `json:"name"`
	Arguments json.RawMessage `json:"arguments"`
}

// transferArgs is how a typed Go tool reads its arguments: encoding/json binds "Amount",
// "AMOUNT" or "amounſ"-style spellings to the amount field.
type transferArgs struct {
	Amount float64 `json:"amount"`
	To     string  `json:"to"`
}

type initParams struct {
	ProtocolVersion string `json:"protocolVersion"`
}

type rpcError struct {
	Code    int    `json:"code"`
	Message string `json:"message"`
}

type response struct {
	JSONRPC string          `json:"jsonrpc"`
	ID      json.RawMessage `json:"id"`
	Result  any             `json:"result,omitempty"`
	Error   *rpcError       `json:"error,omitempty"`
}

type logFile struct {
	mu sync.Mutex
	f  *os.File
}

func openLog(path string) *logFile {
	if path == "" {
		return nil
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		fmt.Fprintf(os.Stderr, "lenient-go: open %s: %v\n", path, err)
		os.Exit(2)
	}
	return &logFile{f: f}
}

// write appends one JSON line; os.File is unbuffered, so it is on disk when write returns.
func (l *logFile) write(v any) {
	if l == nil {
		return
	}
	line, err := json.Marshal(v)
	if err != nil {
		line, _ = json.Marshal(map[string]string{"unloggable": err.Error()})
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	l.f.Write(append(line, '\n'))
}

var (
	executions *logFile
	requests   *logFile
)

func schema(props map[string]any) map[string]any {
	return map[string]any{"type": "object", "properties": props}
}

var tools = []map[string]any{
	{"name": "echo", "description": "Echo text", "inputSchema": schema(map[string]any{"text": map[string]any{"type": "string"}})},
	{"name": "secret_dump", "description": "Dump secrets", "inputSchema": schema(map[string]any{})},
	{"name": "start_security_scan", "description": "Start a scan", "inputSchema": schema(map[string]any{"cluster": map[string]any{"type": "string"}})},
	{"name": "drop_cluster", "description": "Drop a cluster", "inputSchema": schema(map[string]any{"cluster": map[string]any{"type": "string"}})},
	{"name": "transfer", "description": "Transfer money", "inputSchema": schema(map[string]any{"amount": map[string]any{"type": "number"}, "to": map[string]any{"type": "string"}})},
}

func isNull(raw json.RawMessage) bool {
	return len(raw) == 0 || string(raw) == "null"
}

// answer returns the response to one message, or nil for a notification or a response.
func answer(raw json.RawMessage) *response {
	var m message
	if err := json.Unmarshal(raw, &m); err != nil {
		return &response{JSONRPC: "2.0", ID: json.RawMessage("null"), Error: &rpcError{-32600, "Invalid Request: " + err.Error()}}
	}
	if m.Method == "" || isNull(m.ID) {
		return nil // a response, or a notification
	}
	r := &response{JSONRPC: "2.0", ID: m.ID}
	switch m.Method {
	case "initialize":
		var p initParams
		if !isNull(m.Params) {
			json.Unmarshal(m.Params, &p)
		}
		version := p.ProtocolVersion
		if version == "" {
			version = "2025-06-18"
		}
		r.Result = map[string]any{
			"protocolVersion": version,
			"capabilities":    map[string]any{"tools": map[string]any{}},
			"serverInfo":      map[string]any{"name": "lenient-go", "version": "1"},
		}
	case "tools/list":
		r.Result = map[string]any{"tools": tools}
	case "tools/call":
		var p callParams
		if err := json.Unmarshal(m.Params, &p); err != nil {
			r.Error = &rpcError{-32602, "Invalid params: " + err.Error()}
			return r
		}
		var args any
		if p.Name == "transfer" {
			var t transferArgs
			if len(p.Arguments) > 0 {
				if err := json.Unmarshal(p.Arguments, &t); err != nil {
					r.Error = &rpcError{-32602, "Invalid params: " + err.Error()}
					return r
				}
			}
			bound := map[string]any{"amount": t.Amount}
			if t.To != "" {
				bound["to"] = t.To
			}
			args = bound
		} else {
			var m map[string]any
			if len(p.Arguments) > 0 {
				if err := json.Unmarshal(p.Arguments, &m); err != nil {
					r.Error = &rpcError{-32602, "Invalid params: " + err.Error()}
					return r
				}
			}
			args = m
		}
		executions.write(map[string]any{"tool": p.Name, "arguments": args})
		r.Result = map[string]any{"content": []any{map[string]any{"type": "text", "text": "go ran " + p.Name}}}
	default:
		r.Result = map[string]any{}
	}
	return r
}

func reply(w http.ResponseWriter, status int, v any) {
	body, _ := json.Marshal(v)
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	w.Write(body)
}

func handle(w http.ResponseWriter, req *http.Request) {
	body, err := io.ReadAll(req.Body)
	requests.write(map[string]any{"method": req.Method, "path": req.URL.RequestURI(), "length": len(body)})
	if err != nil {
		reply(w, http.StatusBadRequest, response{JSONRPC: "2.0", ID: json.RawMessage("null"), Error: &rpcError{-32700, "Parse error: " + err.Error()}})
		return
	}
	trimmed := bytes.TrimLeft(body, " \t\r\n")
	if len(trimmed) > 0 && trimmed[0] == '[' {
		var batch []json.RawMessage
		if err := json.Unmarshal(body, &batch); err != nil {
			reply(w, http.StatusBadRequest, response{JSONRPC: "2.0", ID: json.RawMessage("null"), Error: &rpcError{-32700, "Parse error: " + err.Error()}})
			return
		}
		out := []*response{}
		for _, el := range batch {
			if r := answer(el); r != nil {
				out = append(out, r)
			}
		}
		if len(out) == 0 {
			w.WriteHeader(http.StatusAccepted)
			return
		}
		reply(w, http.StatusOK, out)
		return
	}
	var raw json.RawMessage
	if err := json.Unmarshal(body, &raw); err != nil {
		reply(w, http.StatusBadRequest, response{JSONRPC: "2.0", ID: json.RawMessage("null"), Error: &rpcError{-32700, "Parse error: " + err.Error()}})
		return
	}
	r := answer(raw)
	if r == nil {
		w.WriteHeader(http.StatusAccepted)
		return
	}
	reply(w, http.StatusOK, r)
}

func main() {
	listen := flag.String("listen", "127.0.0.1:0", "address to listen on")
	logPath := flag.String("log", "", "executions log (JSON lines)")
	reqPath := flag.String("requests", "", "requests log (JSON lines)")
	flag.Parse()
	if *logPath == "" {
		fmt.Fprintln(os.Stderr, "lenient-go: --log is required")
		os.Exit(2)
	}
	executions = openLog(*logPath)
	requests = openLog(*reqPath)
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		fmt.Fprintf(os.Stderr, "lenient-go: listen %s: %v\n", *listen, err)
		os.Exit(1)
	}
	fmt.Printf("listening %s\n", ln.Addr())
	os.Stdout.Sync()
	if err := http.Serve(ln, http.HandlerFunc(handle)); err != nil {
		fmt.Fprintf(os.Stderr, "lenient-go: serve: %v\n", err)
		os.Exit(1)
	}
}
