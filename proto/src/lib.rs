//! `.proto` files and the generated tonic code for Core, gateways and Edges; filled by the Core and Edge issue.
