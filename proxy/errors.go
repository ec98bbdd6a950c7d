package proxy

import (
	"net/http"
)

// corsHeaders are what Synapse sends on every client API response, errors
// included. Answers the proxy makes itself carry them too, or browser clients
// such as Element Web could not read them (a cache hit, a 502, a 429).
var corsHeaders = [...][2]string{
	{"Access-Control-Allow-Origin", "*"},
	{"Access-Control-Allow-Methods", "GET, HEAD, POST, PUT, DELETE, OPTIONS"},
	{"Access-Control-Allow-Headers", "X-Requested-With, Content-Type, Authorization, Date"},
	{"Access-Control-Expose-Headers", "Synapse-Trace-Id, Server"},
}

// setCORS adds the CORS headers a browser client needs, unless the
// homeserver already said otherwise.
func setCORS(h http.Header) {
	for _, kv := range corsHeaders {
		if _, ok := h[kv[0]]; !ok {
			h[kv[0]] = []string{kv[1]}
		}
	}
}

// Matrix errors the proxy answers itself (Client-Server API, "Standard error
// response"). M_UNKNOWN is the spec's catch-all; clients treat it as retryable
// server trouble, unlike M_UNKNOWN_TOKEN, which logs them out.
var (
	errBadGateway     = matrixError{http.StatusBadGateway, "M_UNKNOWN", "The homeserver could not be reached"}
	errGatewayTimeout = matrixError{http.StatusGatewayTimeout, "M_UNKNOWN", "The homeserver did not answer in time"}
	errBodyTimeout    = matrixError{http.StatusRequestTimeout, "M_UNKNOWN", "The request body did not arrive in time"}
	errFormBody       = matrixError{http.StatusBadRequest, "M_NOT_JSON", "This endpoint takes a JSON body, or a form-encoded one of at most 64 KiB"}
)

type matrixError struct {
	status  int
	errcode string
	message string
}

func (e matrixError) write(w http.ResponseWriter) {
	h := w.Header()
	h.Set("Content-Type", "application/json")
	h.Set("Cache-Control", "no-cache, no-store, must-revalidate")
	setCORS(h)
	w.WriteHeader(e.status)
	_, _ = w.Write([]byte(`{"errcode":"` + e.errcode + `","error":"` + e.message + `"}`))
}
