"""L7 inspection of the first payloads of each flow (capture side only: payload bytes never
leave the capture service; only the label and the extracted names travel in the records).

The capture loop owns one FlowInspector per flow (capture/inspect/flow.py) and feeds it the
payloads of the flow's first packets; the inspector decides the application and extracts the
server name (TLS/QUIC SNI, HTTP Host, DNS query name) and the TLS fingerprint (JA4). Parsers
return names as the packet's bytes; names.safe_name() is the one function that makes them text
(escaped, length-capped), applied where capture.batching appends them to a message.
"""
