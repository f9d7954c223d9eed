"""The HTTP/1.1 server every grozd daemon serves with (httptools on uvloop): the store's v2 API,
fleet's API, flanneld's health endpoint. It knows nothing of what it serves."""
